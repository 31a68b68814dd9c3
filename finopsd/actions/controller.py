"""The controller: turns findings into actions and drives each through the lifecycle.

It is the only caller of actuators. Every transition is written first — a row of
``actions`` rewritten and a row appended to ``action_audit``, in one store
transaction — and only then is the world changed; after the change the next
transition records what happened. A process killed at any instant therefore
finds each action in a state that says what may have happened, and ``tick``
(which start-up runs before anything else) finishes it by observing the live
target: an action in ``applying`` whose target is live goes on, one whose base
is still live is applied again (``apply`` is idempotent), one whose target
someone else changed fails without touching it; one in ``rolling_back`` is rolled
back again (idempotent too). Nothing is applied twice, nothing is left half-done.

``tick()`` — one pass, in this order: propose actions for eligible open findings,
expire approvals, suppress pending actions whose finding went away, advance every
live action one step (apply, verify, step up, promote, roll back), bring the
savings ledger up to date, publish the audit rows not yet sent.

The API and CLI call ``approve``, ``reject``, ``rollback``, ``pause`` and ``plan``;
they take the same lock as ``tick`` so that one action moves one step at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import duckdb

from finopsd import views
from finopsd.actions import ledger
from finopsd.actions.base import Actuator, ActuatorError, Plan, PlanContext
from finopsd.actions.lifecycle import FINAL, LIVE, PENDING, State, check
from finopsd.actions.suggestion import Suggestion
from finopsd.actions.verify import Sample, Tolerances, Verdict, judge
from finopsd.analyzers.base import ActionSpec
from finopsd.analyzers.runner import stored_findings
from finopsd.config import ActionsSettings, PolicyRule
from finopsd.pricing import PriceBook
from finopsd.store import Store

log = logging.getLogger(__name__)

#: kinds whose steps move a share of a scope's traffic (canary first)
TRAFFIC_KINDS = frozenset({"gateway.route"})
SAMPLE_LIMIT = 200_000  # requests per group read for a verdict (the most recent)
#: the end states after which a finding is not proposed again
NOT_AGAIN = frozenset({State.REJECTED, State.ROLLED_BACK, State.FAILED})


class ActionError(ValueError):
    """A request about an action cannot be carried out; the message says why."""


class UnknownAction(ActionError):
    """No action (or finding) has that id."""


class EventSink(Protocol):
    """Where audit rows are published (the ``finopsd.actions`` topic)."""

    def send(self, key: str, value: dict[str, Any]) -> bool:
        """Send one event; True once the broker has it (False: try again later)."""
        ...


@dataclass(frozen=True)
class Decision:
    state: State
    reason: str


class Controller:
    """See the module docstring."""

    def __init__(
        self,
        store: Store,
        settings: ActionsSettings,
        prices: PriceBook,
        actuators: Mapping[str, Actuator],
        *,
        events: EventSink | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.settings = settings
        self.prices = prices
        self.actuators = dict(actuators)
        self.events = events
        self.clock = clock
        self._lock = threading.RLock()
        self._fallback = Suggestion()
        self._applied_here: set[str] = set()  # actions whose live step this process applied

    # -- reading ----------------------------------------------------------------------

    def actuator_for(self, kind: str) -> Actuator:
        return self.actuators.get(kind) or self._fallback

    def list(
        self, *, state: str | None = None, finding_id: str | None = None
    ) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM actions WHERE true", []
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if finding_id is not None:
            sql += " AND finding_id = ?"
            params.append(finding_id)
        return _rows(self.store.cursor(), sql + " ORDER BY created_at DESC, id", params)

    def get(self, action_id: str) -> dict[str, Any]:
        rows = _rows(self.store.cursor(), "SELECT * FROM actions WHERE id = ?", [action_id])
        if not rows:
            raise UnknownAction(f"no action {action_id!r}")
        return rows[0]

    def audit(self, action_id: str) -> list[dict[str, Any]]:
        return _rows(
            self.store.cursor(),
            "SELECT * FROM action_audit WHERE action_id = ? ORDER BY seq",
            [action_id],
        )

    def plan(self, finding_id: str) -> Plan:
        """The first step's plan for a stored finding (a dry run; nothing is recorded)."""
        finding = self._finding(finding_id)
        if finding is None or finding.get("action") is None:
            raise UnknownAction(f"no finding {finding_id!r} with an action")
        spec = _spec(finding["action"])
        baseline = self._baseline(finding, spec)
        share = self._first_share(spec, self.settings.rule(spec.actuator, _tenant(finding)))
        return self.actuator_for(spec.actuator).plan(
            _step_spec(spec, baseline, share), share, self._context(finding, baseline)
        )

    # -- requests from people -------------------------------------------------------------

    def approve(self, action_id: str, actor: str) -> dict[str, Any]:
        with self._lock:
            action = self.get(action_id)
            if action["state"] != State.AWAITING_APPROVAL:
                raise ActionError(f"action {action_id} is {action['state']}, not awaiting approval")
            if action["expires_at"] is not None and self.clock() >= action["expires_at"]:
                self._move(action, State.EXPIRED, "policy", "the approval window passed")
                raise ActionError(f"action {action_id} expired at {action['expires_at']:%F %RZ}")
            self._move(action, State.APPROVED, actor, f"approved by {actor}", approver=actor)
            return self.get(action_id)

    def reject(self, action_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        with self._lock:
            action = self.get(action_id)
            if action["state"] not in (State.AWAITING_APPROVAL, State.PROPOSED, State.APPROVED):
                raise ActionError(f"action {action_id} is {action['state']}: too late to reject")
            target = State.REJECTED if action["state"] == State.AWAITING_APPROVAL else None
            if target is None:  # proposed/approved: rejecting is suppressing by hand
                target = State.SUPPRESSED
            why = f"rejected by {actor}" + (f": {reason}" if reason else "")
            self._move(action, target, actor, why, approver=actor)
            return self.get(action_id)

    def rollback(self, action_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        with self._lock:
            action = self.get(action_id)
            if action["state"] not in LIVE or action["state"] == State.ROLLING_BACK:
                raise ActionError(f"action {action_id} is {action['state']}: nothing to roll back")
            why = f"rolled back by {actor}" + (f": {reason}" if reason else "")
            self._roll_back(action, actor, why)
            return self.get(action_id)

    def pause(self, action_id: str, actor: str, paused: bool = True) -> dict[str, Any]:
        """A paused action stays where it is (no step, no verdict) until resumed."""
        with self._lock:
            action = self.get(action_id)
            if action["state"] in FINAL:
                raise ActionError(f"action {action_id} is {action['state']}: it is over")

            def work(con: duckdb.DuckDBPyConnection) -> None:
                con.execute(
                    "UPDATE actions SET paused = ?, updated_at = ? WHERE id = ?",
                    [paused, self.clock(), action_id],
                )
                self._append_audit(
                    con,
                    action_id,
                    actor,
                    action["state"],
                    action["state"],
                    ("paused" if paused else "resumed") + f" by {actor}",
                )

            self.store.write(work)
            self._publish()
            return self.get(action_id)

    # -- the loop ---------------------------------------------------------------------------

    def tick(self) -> dict[str, int]:
        """One pass (see the module docstring); returns counts of what it did."""
        with self._lock:
            done = {"proposed": self._propose(), "advanced": 0}
            self._expire_and_suppress()
            for action in self.list():
                if action["state"] in FINAL or action["paused"]:
                    continue
                try:
                    if self._advance(action):
                        done["advanced"] += 1
                except Exception as exc:  # one action's failure never stops the others
                    log.exception("action %s: %s", action["id"], exc)
            self._update_ledger()
            done["published"] = self._publish()
            return done

    # -- proposing ----------------------------------------------------------------------------

    def _propose(self) -> int:
        findings = [f for f in stored_findings(self.store.cursor()) if f.get("action")]
        existing: dict[str, list[dict[str, Any]]] = {}
        for a in self.list():
            existing.setdefault(a["finding_id"], []).append(a)
        made = 0
        for finding in findings:
            spec = _spec(finding["action"])
            rule = self.settings.rule(spec.actuator, _tenant(finding))
            history = existing.get(finding["id"], [])
            if any(a["state"] not in FINAL for a in history):
                continue
            if any(a["state"] in NOT_AGAIN for a in history):
                continue  # a person said no, or it was tried and undone
            why_not = _ineligible(finding, rule)
            if why_not is not None:
                log.debug("finding %s not proposed: %s", finding["id"], why_not)
                continue
            try:
                self._create(finding, spec, rule)
            except Exception as exc:  # e.g. the gateway's config unreadable: try next tick
                log.warning("finding %s: no action proposed: %s", finding["id"], exc)
                continue
            made += 1
        return made

    def _create(self, finding: dict[str, Any], spec: ActionSpec, rule: PolicyRule) -> None:
        now = self.clock()
        baseline = self._baseline(finding, spec)
        share = self._first_share(spec, rule)
        plan = self.actuator_for(spec.actuator).plan(
            _step_spec(spec, baseline, share), share, self._context(finding, baseline)
        )
        action_id = "a-" + uuid.uuid4().hex[:12]
        target = _target_share(spec, baseline) if spec.actuator in TRAFFIC_KINDS else None
        row = {
            "id": action_id,
            "finding_id": finding["id"],
            "finding_kind": finding["kind"],
            "actuator": spec.actuator,
            "backend": plan.backend,
            "tenant": _tenant(finding),
            "scope": json.dumps(finding["scope"]),
            "spec": json.dumps(spec.as_dict()),
            "mode": rule.mode if plan.expressible else "suggest",
            "state": State.PROPOSED.value,
            "paused": False,
            "dry_run": self.settings.dry_run,
            "monthly_savings_usd": float(finding["monthly_savings_usd"]),
            "monthly_savings_low_usd": float(finding["monthly_savings_low_usd"]),
            "monthly_savings_high_usd": float(finding["monthly_savings_high_usd"]),
            "confidence": float(finding["confidence"]),
            "target_share": target,
            "share": None,
            "step": 0,
            "plan": json.dumps(plan.as_dict()),
            "baseline": json.dumps(baseline),
            "verdict": None,
            "reason": plan.reason if not plan.expressible else "proposed",
            "approver": None,
            "created_at": now,
            "updated_at": now,
            "expires_at": None,
            "step_started_at": None,
            "applied_at": None,
            "ended_at": None,
        }

        def work(con: duckdb.DuckDBPyConnection) -> None:
            cols = ", ".join(row)
            con.execute(
                f"INSERT INTO actions ({cols}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
            self._append_audit(
                con,
                action_id,
                "controller",
                None,
                State.PROPOSED,
                f"from finding {finding['id']}: {finding['title']}",
                diff=plan.diff,
                detail={"plan": plan.as_dict()},
            )

        self.store.write(work)
        action = self.get(action_id)
        if plan.expressible:
            self._decide(action)

    def _decide(self, action: dict[str, Any]) -> None:
        """Move a proposed action on as its policy says (or leave it, saying why)."""
        rule = self.settings.rule(action["actuator"], action["tenant"])
        decision = self._decision(action, rule)
        if decision is None:
            return
        mode = rule.mode if Plan.from_dict(_json(action["plan"])).expressible else "suggest"
        if decision.state == State.PROPOSED:
            if decision.reason != action["reason"] or mode != action["mode"]:
                self._update(action, reason=decision.reason, mode=mode)
            return
        if mode != action["mode"]:
            self._update(action, mode=mode)
        extra: dict[str, Any] = {}
        if decision.state == State.AWAITING_APPROVAL:
            extra["expires_at"] = self.clock() + timedelta(
                hours=self.settings.approval_expiry_hours
            )
        actor = "policy"
        self._move(action, decision.state, actor, decision.reason, **extra)

    def _decision(self, action: dict[str, Any], rule: PolicyRule) -> Decision | None:
        mode = rule.mode
        plan = Plan.from_dict(_json(action["plan"]))
        if not plan.expressible:
            return Decision(State.PROPOSED, plan.reason)
        if mode == "off":
            return Decision(State.SUPPRESSED, f"policy for {action['actuator']} is off")
        if mode == "suggest":
            return Decision(
                State.PROPOSED, f"suggestion: policy for {action['actuator']} is suggest"
            )
        if self.settings.dry_run:
            return Decision(State.PROPOSED, "dry run (actions.dry_run): planned, not applied")
        if mode == "approve":
            return Decision(State.AWAITING_APPROVAL, f"policy for {action['actuator']} is approve")
        limit = rule.max_auto_monthly_usd
        if limit is not None and action["monthly_savings_usd"] > limit:
            return Decision(
                State.AWAITING_APPROVAL,
                f"${action['monthly_savings_usd']:,.2f}/month at stake is above "
                f"max_auto_monthly_usd ${limit:,.2f}: approval needed",
            )
        waiting = self._over_daily_limit(action, rule)
        if waiting is not None:
            return Decision(State.PROPOSED, waiting)
        return Decision(State.APPROVED, f"policy for {action['actuator']} is auto")

    def _expire_and_suppress(self) -> None:
        now = self.clock()
        open_ids = {f["id"] for f in stored_findings(self.store.cursor())}
        for action in self.list():
            try:
                self._settle_pending(action, now, open_ids)
            except Exception as exc:  # one action's failure never stops the others
                log.warning("action %s: %s", action["id"], exc)

    def _settle_pending(self, action: dict[str, Any], now: datetime, open_ids: set[str]) -> None:
        state = State(action["state"])
        if state in PENDING:
            if (
                state == State.AWAITING_APPROVAL
                and action["expires_at"] is not None
                and now >= action["expires_at"]
            ):
                self._move(
                    action, State.EXPIRED, "policy", "no decision before the approval window ended"
                )
            elif action["finding_id"] not in open_ids:
                self._move(action, State.SUPPRESSED, "controller", "its finding is no longer open")
            elif state == State.PROPOSED and not action["paused"]:
                self._decide(action)  # policy, limits or the kill switch may have changed

    # -- driving live actions -------------------------------------------------------------------

    def _advance(self, action: dict[str, Any]) -> bool:
        state = State(action["state"])
        if state == State.APPROVED:
            return self._start(action)
        if state == State.APPLYING:
            return self._reconcile_applying(action)
        if state == State.ROLLING_BACK:
            self._finish_rollback(action, "controller")
            return True
        if state in (State.CANARY, State.PROMOTED, State.VERIFYING):
            return self._verify(action)
        return False

    def _start(self, action: dict[str, Any]) -> bool:
        rule = self.settings.rule(action["actuator"], action["tenant"])
        if self.settings.dry_run:
            return self._hold(action, "dry run (actions.dry_run): approved, not applied")
        waiting = self._over_daily_limit(action, rule)
        if waiting is not None:
            return self._hold(action, waiting)
        return self._apply_step(action, self._first_share(_spec(action["spec"]), rule), first=True)

    def _apply_step(self, action: dict[str, Any], share: float | None, *, first: bool) -> bool:
        spec = _spec(action["spec"])
        baseline = _json(action["baseline"]) or {}
        finding = self._finding(action["finding_id"]) or {
            "id": action["finding_id"],
            "scope": _json(action["scope"]),
            "evidence": {},
        }
        actuator = self.actuator_for(spec.actuator)
        try:
            plan = actuator.plan(
                _step_spec(spec, baseline, share), share, self._context(finding, baseline)
            )
        except ActuatorError as exc:
            if first:  # nothing changed yet
                self._move(action, State.SUPPRESSED, "controller", f"cannot plan: {exc}")
            else:
                self._roll_back(action, "controller", f"cannot plan the next step: {exc}")
            return True
        if first:
            baseline["original"] = plan.base
        step = int(action["step"]) + 1
        plan.detail.setdefault("step", step)
        what = f"step {step}: {plan.description}" + (
            f" ({share:.0%} of the scope's traffic)" if share is not None else ""
        )
        self._move(
            action,
            State.APPLYING,
            "controller",
            what,
            diff=plan.diff,
            plan=json.dumps(plan.as_dict()),
            baseline=json.dumps(baseline),
            step=step,
            share=share,
        )
        return self._do_apply(self.get(action["id"]), plan)

    def _do_apply(self, action: dict[str, Any], plan: Plan) -> bool:
        actuator = self.actuator_for(action["actuator"])
        try:
            detail = actuator.apply(plan, action["id"])
        except Exception as exc:
            log.warning("action %s: apply failed: %s", action["id"], exc)
            self._roll_back(action, "controller", f"apply failed: {exc}")
            return True
        self._applied_here.add(action["id"])
        return self._confirm(self.get(action["id"]), plan, detail)

    def _confirm(self, action: dict[str, Any], plan: Plan, detail: dict[str, Any]) -> bool:
        """After ``apply``: the step is live once ``observe`` says so."""
        live = self.actuator_for(action["actuator"]).observe(plan, action["id"])
        if live == "target":
            return self._live(action, plan, detail)
        if live == "pending":
            self._applied_here.add(action["id"])
            return self._wait_for_ack(action, plan)
        if live == "refused":
            self._roll_back(action, "controller", "the external controller refused the change")
            return True
        self._roll_back(action, "controller", f"applied, yet the target is {live}: not the plan")
        return True

    def _wait_for_ack(self, action: dict[str, Any], plan: Plan) -> bool:
        timeout = self.settings.command.timeout_s
        row = (
            self.store.cursor()
            .execute(
                "SELECT max(occurred_at) FROM action_audit WHERE action_id = ? AND to_state = ?",
                [action["id"], State.APPLYING.value],
            )
            .fetchone()
        )
        since = row[0] if row and row[0] is not None else action["updated_at"]
        waited = (self.clock() - since).total_seconds()
        if waited >= timeout:
            self._roll_back(
                action, "controller", f"no acknowledgement in {timeout:,.0f} s: given up"
            )
            return True
        return self._hold(action, "waiting for the external controller's acknowledgement")

    def _live(self, action: dict[str, Any], plan: Plan, detail: dict[str, Any]) -> bool:
        now = self.clock()
        target = action["target_share"]
        share = plan.share
        state = (
            State.CANARY
            if target is not None and share is not None and share < target - 1e-9
            else State.PROMOTED
        )
        note = (
            ""
            if share is not None or target is None
            else " (the gateway cannot split it: no canary)"
        )
        self._move(
            action,
            state,
            "controller",
            f"step {action['step']} live{note}",
            detail=detail,
            step_started_at=now,
            applied_at=action["applied_at"] or now,
        )
        return True

    def _reconcile_applying(self, action: dict[str, Any]) -> bool:
        plan = Plan.from_dict(_json(action["plan"]))
        actuator = self.actuator_for(action["actuator"])
        live = actuator.observe(plan, action["id"])
        if live == "target" and action["id"] in self._applied_here:
            return self._live(action, plan, {})
        if live in ("target", "base"):  # apply is idempotent: a reload not done is done now
            log.info("action %s found applying, its %s live: applying again", action["id"], live)
            return self._do_apply(action, plan)
        if live == "pending":
            if action["id"] not in self._applied_here:  # this process may not have sent it
                self._applied_here.add(action["id"])
                try:
                    actuator.apply(plan, action["id"])  # the same command id: one command
                except ActuatorError as exc:
                    log.warning("action %s: sending again failed: %s", action["id"], exc)
            return self._wait_for_ack(action, plan)
        if live == "refused":
            self._roll_back(action, "controller", "the external controller refused the change")
            return True
        log.info("action %s found applying; the live target is its %s", action["id"], live)
        self._move(
            action,
            State.FAILED,
            "controller",
            "the target was changed by someone else while applying: left as it is",
            ended_at=self.clock(),
        )
        return True

    def _verify(self, action: dict[str, Any]) -> bool:
        v = self.settings.verify
        now = self.clock()
        started = action["step_started_at"]
        if started is None:
            return False
        verdict = self._judge(action)
        if verdict.touched_requests < v.min_requests and not verdict.reasons:
            waited = (now - started) / timedelta(hours=1)
            if action["state"] == State.CANARY and waited >= v.max_wait_hours:
                self._roll_back(
                    action,
                    "controller",
                    f"not verifiable: {verdict.touched_requests:,} touched requests in "
                    f"{waited:.0f} h (min_requests {v.min_requests:,})",
                )
                return True
            return False
        rule = self.settings.rule(action["actuator"], action["tenant"])
        passing = verdict.passed
        if passing and action["state"] == State.CANARY:
            steps_today = self._steps_today(action["id"])
            if rule.max_steps_per_day is not None and steps_today >= rule.max_steps_per_day:
                return self._hold(
                    action,
                    f"verified; waiting: {steps_today} step(s) today "
                    f"(max_steps_per_day {rule.max_steps_per_day})",
                )
            if self.settings.dry_run:
                return self._hold(action, "verified; dry run (actions.dry_run): no step up")
        if action["state"] != State.VERIFYING:
            self._move(
                action,
                State.VERIFYING,
                "controller",
                f"{verdict.touched_requests:,} touched requests: judging step {action['step']}",
                verdict=json.dumps(verdict.as_dict()),
            )
            action = self.get(action["id"])
        if not passing:
            self._roll_back(action, "controller", f"regression: {verdict.summary()}")
            return True
        share, target = action["share"], action["target_share"]
        if target is not None and share is not None and share < target - 1e-9:
            step = min(target, share + (rule.max_share_step or 1.0))
            return self._apply_step(action, step, first=False)
        self._move(action, State.VERIFIED, "controller", f"verified: {verdict.summary()}")
        return True

    def _judge(self, action: dict[str, Any]) -> Verdict:
        v = self.settings.verify
        con = self.store.cursor()
        spec = _spec(action["spec"])
        baseline = _json(action["baseline"]) or {}
        params = spec.params
        scope = params.get("scope") or params.get("match") or _json(action["scope"])
        where, args = ledger.scope_filter(scope)
        started, applied = (
            action["step_started_at"],
            action["applied_at"] or action["step_started_at"],
        )
        before_from = applied - timedelta(hours=v.baseline_hours)
        tol = Tolerances(
            confidence=v.confidence,
            error_rate=v.max_error_rate_increase,
            p95_latency=v.max_p95_latency_increase,
            cost=v.max_cost_increase,
            quality=v.max_quality_drop,
        )
        if spec.actuator in TRAFFIC_KINDS or spec.actuator == "gateway.cascade":
            moved = _moved_models(spec, baseline, Plan.from_dict(_json(action["plan"])))
            where, args = ledger.route_filter(scope)
            served = f"{ledger.SERVED} IN (SELECT unnest(?::VARCHAR[]))"
            before = self._sample(con, where, args, before_from, applied)
            touched = self._sample(
                con,
                f"{where} AND {served}",
                [*args, moved],
                started,
                self.clock(),
                cache_hits=False,
            )
            rest = self._sample(
                con, f"{where} AND NOT {served}", [*args, moved], started, self.clock()
            )
            control = rest if rest.requests else None
            return judge(
                touched,
                before,
                tol,
                control_before=before if control is not None else None,
                control_after=control,
                quality_bar=baseline.get("promised_quality"),
            )
        touched = self._sample(con, where, args, started, self.clock())
        before = self._sample(con, where, args, before_from, applied)
        outside = f"NOT ({where})"
        return judge(
            touched,
            before,
            tol,
            control_before=self._sample(con, outside, args, before_from, applied),
            control_after=self._sample(con, outside, args, started, self.clock()),
        )

    @staticmethod
    def _sample(
        con: duckdb.DuckDBPyConnection,
        where: str,
        args: list[Any],
        start: datetime,
        end: datetime,
        *,
        cache_hits: bool = True,
    ) -> Sample:
        hits = "" if cache_hits else " AND NOT coalesce(cache_hit, false)"
        rows = con.execute(
            "SELECT status, latency_ms, cost_usd, quality_score FROM usage_events "
            f"WHERE ts >= ? AND ts < ? AND ({where}){hits} ORDER BY ts DESC LIMIT {SAMPLE_LIMIT}",
            [start, end, *args],
        ).fetchall()
        return Sample.of(rows)

    def _roll_back(self, action: dict[str, Any], actor: str, reason: str) -> None:
        self._move(action, State.ROLLING_BACK, actor, reason)
        self._finish_rollback(self.get(action["id"]), actor)

    def _finish_rollback(self, action: dict[str, Any], actor: str) -> None:
        plan = Plan.from_dict(_json(action["plan"]))
        baseline = _json(action["baseline"]) or {}
        if baseline.get("original"):
            plan.base = baseline["original"]
        try:
            detail = self.actuator_for(action["actuator"]).rollback(plan, action["id"])
        except Exception as exc:
            log.error("action %s: rollback failed: %s", action["id"], exc)
            self._move(
                action,
                State.FAILED,
                actor,
                f"{action['reason']}; rollback failed: {exc} (a person must look)",
                ended_at=self.clock(),
            )
            return
        self._move(
            action,
            State.ROLLED_BACK,
            actor,
            f"{action['reason']}; the configuration before the action is restored",
            detail=detail,
            ended_at=self.clock(),
        )

    def _hold(self, action: dict[str, Any], reason: str) -> bool:
        if action["reason"] != reason:
            self._update(action, reason=reason)
        return False

    # -- ledger ---------------------------------------------------------------------------------

    def _update_ledger(self) -> None:
        con = self.store.cursor()
        recorded = dict(
            con.execute("SELECT action_id, max(day) FROM savings_ledger GROUP BY 1").fetchall()
        )
        days: list[ledger.LedgerDay] = []
        for action in self.list():
            if action["applied_at"] is None:
                continue
            last = recorded.get(action["id"])  # days before it are final; it may not be
            ended = action["ended_at"]
            if ended is not None and (
                (last is not None and last >= ended.astimezone(UTC).date())
                or (last is None and self.clock() - ended > timedelta(days=2))
            ):
                continue  # over, and recorded to its end (or it touched nothing)
            try:
                days += ledger.compute(con, self.prices, action, now=self.clock(), since=last)
            except Exception as exc:
                log.warning("savings of action %s not computed: %s", action["id"], exc)
        if days:
            self.store.write(lambda c: ledger.record(c, days))

    # -- recording ------------------------------------------------------------------------------

    def _move(
        self,
        action: dict[str, Any],
        to: State,
        actor: str,
        reason: str,
        *,
        diff: str | None = None,
        detail: dict[str, Any] | None = None,
        **updates: Any,
    ) -> None:
        current = State(action["state"])
        check(current, to)
        now = self.clock()
        values = {"state": to.value, "reason": reason, "updated_at": now, **updates}

        def work(con: duckdb.DuckDBPyConnection) -> None:
            row = con.execute("SELECT state FROM actions WHERE id = ?", [action["id"]]).fetchone()
            if row is None or row[0] != current:
                raise ActionError(f"action {action['id']} moved on meanwhile ({row and row[0]})")
            sets = ", ".join(f"{k} = ?" for k in values)
            con.execute(f"UPDATE actions SET {sets} WHERE id = ?", [*values.values(), action["id"]])
            self._append_audit(
                con, action["id"], actor, current, to, reason, diff=diff, detail=detail
            )

        self.store.write(work)
        action.update(values)
        log.info("action %s: %s -> %s (%s): %s", action["id"], current, to, actor, reason)

    def _update(self, action: dict[str, Any], **values: Any) -> None:
        values["updated_at"] = self.clock()
        sets = ", ".join(f"{k} = ?" for k in values)
        self.store.write(
            lambda con: con.execute(
                f"UPDATE actions SET {sets} WHERE id = ?", [*values.values(), action["id"]]
            )
        )
        action.update(values)

    def _append_audit(
        self,
        con: duckdb.DuckDBPyConnection,
        action_id: str,
        actor: str,
        from_state: str | None,
        to_state: str,
        reason: str,
        *,
        diff: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        row = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM action_audit").fetchone()
        con.execute(
            "INSERT INTO action_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false)",
            [
                int(row[0]) if row else 1,
                action_id,
                self.clock(),
                actor,
                None if from_state is None else str(from_state),
                str(to_state),
                reason,
                diff or None,
                json.dumps(detail, default=str) if detail else None,
            ],
        )

    def _publish(self) -> int:
        """Send the audit rows not yet published, in order; stop at the first failure."""
        if self.events is None:
            return 0
        rows = _rows(
            self.store.cursor(),
            "SELECT a.*, x.finding_id, x.actuator, x.tenant FROM action_audit a "
            "JOIN actions x ON x.id = a.action_id WHERE NOT a.published ORDER BY a.seq",
            [],
        )
        sent: list[int] = []
        for row in rows:
            event = {
                "seq": row["seq"],
                "action_id": row["action_id"],
                "finding_id": row["finding_id"],
                "actuator": row["actuator"],
                "tenant": row["tenant"],
                "at": row["occurred_at"].isoformat(),
                "actor": row["actor"],
                "from": row["from_state"],
                "to": row["to_state"],
                "reason": row["reason"],
                "diff": row["diff"],
            }
            if not self.events.send(row["action_id"], event):
                break
            sent.append(int(row["seq"]))
        if sent:
            self.store.write(
                lambda con: con.execute(
                    "UPDATE action_audit SET published = true "
                    "WHERE list_contains(?::BIGINT[], seq)",
                    [sent],
                )
            )
        return len(sent)

    # -- helpers ----------------------------------------------------------------------------

    def _finding(self, finding_id: str) -> dict[str, Any] | None:
        return views.finding(self.store.cursor(), finding_id)

    def _baseline(self, finding: dict[str, Any], spec: ActionSpec) -> dict[str, Any]:
        """What is live before the action, as far as verification and the ledger need it:
        the scope's model shares over ``verify.baseline_hours`` and, for a reroute, the
        quality the finding expects of the traffic it moves."""
        params = spec.params
        scope = params.get("scope") or params.get("match") or finding["scope"]
        out: dict[str, Any] = {}
        if spec.actuator in TRAFFIC_KINDS or spec.actuator == "gateway.cascade":
            where, args = ledger.route_filter(scope)
            since = self.clock() - timedelta(hours=self.settings.verify.baseline_hours)
            con = self.store.cursor()
            for key, column in (("shares", "request_model"), ("served", ledger.SERVED)):
                rows = con.execute(
                    f"SELECT {column}, count(*) FROM usage_events WHERE ts >= ? AND {where} "
                    "GROUP BY 1",
                    [since, *args],
                ).fetchall()
                total = sum(n for _, n in rows) or 1
                out[key] = {m: n / total for m, n in rows}
            if not out["shares"] and scope.get("model"):
                out["shares"] = {scope["model"]: 1.0}
            out["served"] = out["served"] or dict(out["shares"])
            out["promised_quality"] = _promised_quality(finding, spec, out["shares"])
        return out

    def _context(self, finding: dict[str, Any], baseline: dict[str, Any]) -> PlanContext:
        spec = _spec(finding["action"]) if finding.get("action") else None
        params = spec.params if spec is not None else {}
        scope = params.get("scope") or params.get("match") or finding.get("scope") or {}
        where, args = ledger.scope_filter({k: v for k, v in scope.items() if k != "model"})
        since = self.clock() - timedelta(hours=self.settings.verify.baseline_hours)

        def share(models: Sequence[str] | None) -> float | None:
            on = "true" if models is None else "request_model IN (SELECT unnest(?::VARCHAR[]))"
            row = (
                self.store.cursor()
                .execute(
                    f"SELECT count(*), count(*) FILTER (WHERE {where}) FROM usage_events "
                    f"WHERE ts >= ? AND {on}",
                    [*args, since, *([list(models)] if models is not None else [])],
                )
                .fetchone()
            )
            if not row or not row[0]:
                return None
            return float(row[1]) / float(row[0])

        return _context(finding, baseline, share)

    def _first_share(self, spec: ActionSpec, rule: PolicyRule) -> float | None:
        if spec.actuator not in TRAFFIC_KINDS:
            return None
        target = sum(
            w
            for m, w in (spec.params.get("weights") or {}).items()
            if m != (spec.params.get("match") or {}).get("model")
        )
        step = min(self.settings.verify.canary_share, rule.max_share_step or 1.0)
        return min(target, step) if target > 0 else None

    def _over_daily_limit(self, action: dict[str, Any], rule: PolicyRule) -> str | None:
        """Why ``action`` must wait for tomorrow (``max_actions_per_day``), or None."""
        today = self._applied_today(action["actuator"])
        if rule.max_actions_per_day is None or today < rule.max_actions_per_day:
            return None
        return (
            f"waiting: {today} {action['actuator']} action(s) applied today "
            f"(max_actions_per_day {rule.max_actions_per_day})"
        )

    def _applied_today(self, kind: str) -> int:
        day = self.clock().replace(hour=0, minute=0, second=0, microsecond=0)
        row = (
            self.store.cursor()
            .execute(
                "SELECT count(DISTINCT a.action_id) FROM action_audit a JOIN actions x "
                "ON x.id = a.action_id WHERE x.actuator = ? AND a.to_state = 'applying' "
                "AND a.from_state = 'approved' AND a.occurred_at >= ?",
                [kind, day],
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    def _steps_today(self, action_id: str) -> int:
        day = self.clock().replace(hour=0, minute=0, second=0, microsecond=0)
        row = (
            self.store.cursor()
            .execute(
                "SELECT count(*) FROM action_audit WHERE action_id = ? AND to_state = 'applying' "
                "AND occurred_at >= ?",
                [action_id, day],
            )
            .fetchone()
        )
        return int(row[0]) if row else 0


def _ineligible(finding: dict[str, Any], rule: PolicyRule) -> str | None:
    if rule.mode == "off":
        return "policy off"
    if finding["provisional"]:
        return "provisional: its evidence is too short to act on"
    if rule.min_confidence is not None and finding["confidence"] < rule.min_confidence:
        return f"confidence {finding['confidence']:.2f} < min_confidence {rule.min_confidence}"
    if rule.min_monthly_usd is not None and finding["monthly_savings_usd"] < rule.min_monthly_usd:
        return f"${finding['monthly_savings_usd']:,.2f}/month < min_monthly_usd"
    return None


def _target_share(spec: ActionSpec, baseline: dict[str, Any]) -> float | None:
    """The share of the scope's traffic a reroute moves off the models it has now."""
    weights = spec.params.get("weights") or {}
    total = sum(weights.values()) or 1.0
    before = baseline.get("shares") or {}
    kept = sum(min(w / total, before.get(m, 0.0)) for m, w in weights.items())
    return round(max(0.0, 1.0 - kept), 6) or None


def _step_spec(spec: ActionSpec, baseline: dict[str, Any], share: float | None) -> ActionSpec:
    """The spec of one step: a reroute's weights moved ``share`` of the way (of the traffic)
    from the shares before towards the target; other specs as they are."""
    if spec.actuator not in TRAFFIC_KINDS or share is None:
        return spec
    target = _target_share(spec, baseline) or 1.0
    t = min(1.0, share / target)
    weights = spec.params.get("weights") or {}
    total = sum(weights.values()) or 1.0
    before = baseline.get("shares") or {}
    models = set(weights) | set(before)
    step = {
        m: round((1 - t) * before.get(m, 0.0) + t * weights.get(m, 0.0) / total, 6) for m in models
    }
    params = dict(spec.params)
    params["weights"] = {m: w for m, w in sorted(step.items()) if w > 0}
    params["target_weights"] = dict(weights)
    return ActionSpec(spec.actuator, params)


def _moved_models(spec: ActionSpec, baseline: dict[str, Any], plan: Plan) -> list[str]:
    """The models (as events name the one that answered) a reroute sends traffic to that
    had none of the scope's before: the touched requests are theirs."""
    before = baseline.get("shares") or {}
    served_as = plan.detail.get("served_as") or {}
    weights = spec.params.get("weights") or {}
    moved = [m for m, w in weights.items() if w > 0 and m not in before]
    names = {served_as.get(m, m) for m in moved} | set(moved)
    return sorted(names)


def _promised_quality(
    finding: dict[str, Any], spec: ActionSpec, before: dict[str, float]
) -> float | None:
    """The mean quality the finding expects of the requests it moves (None: unknown)."""
    if spec.actuator == "gateway.cascade":
        value = spec.params.get("quality_threshold")
        return float(value) if value is not None else None
    candidates = {
        c.get("model"): c.get("quality")
        for c in (finding.get("evidence") or {}).get("candidates") or []
    }
    weights = {m: w for m, w in (spec.params.get("weights") or {}).items() if m not in before}
    known = [(w, candidates.get(m)) for m, w in weights.items() if candidates.get(m) is not None]
    if not known or sum(w for w, _ in known) <= 0:
        return None
    return sum(w * float(q) for w, q in known) / sum(w for w, _ in known)


def _context(
    finding: dict[str, Any],
    baseline: dict[str, Any],
    share: Callable[[Sequence[str] | None], float | None] | None = None,
) -> PlanContext:
    return PlanContext(
        finding_id=finding["id"],
        scope=dict(finding.get("scope") or {}),
        evidence=dict(finding.get("evidence") or {}),
        baseline_shares=dict(baseline.get("shares") or {}),
        scope_share=share or (lambda models: None),
    )


def _tenant(finding: dict[str, Any]) -> str | None:
    scope = finding.get("scope") or {}
    return scope.get("tenant") if isinstance(scope, dict) else None


def _spec(value: Any) -> ActionSpec:
    data = _json(value)
    return ActionSpec(data["actuator"], dict(data.get("params") or {}))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
