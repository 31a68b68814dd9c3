"""The controller on a real store: policy, lifecycle, canary, verification, rollback,
crash reconciliation, the audit trail and its events, the savings ledger.

The finding is the real routing analyzer's, on traffic built here: the feature
"answer" of acme / bot runs on ``big`` (quality 0.95, $0.010 a request) and ``mid``
(0.88, $0.006) serves the same feature, so routing proposes moving it all to mid.
The gateway here is a real file of weights (``FileRoutes``: the smallest actuator
that keeps the contract); the traffic after each step is served by the weights
the file holds when the test reads it, and its quality is the test's to choose.
The LiteLLM actuator on a real proxy has its own tests.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from finopsd.actions import ledger
from finopsd.actions.base import Actuator, ActuatorError, Live, Plan, PlanContext
from finopsd.actions.controller import ActionError, Controller
from finopsd.actions.lifecycle import State
from finopsd.analyzers.base import ActionSpec
from finopsd.analyzers.runner import build, run_analyzers, stored_findings
from finopsd.config import ActionsSettings
from finopsd.pricing import Price, PriceBook
from finopsd.store import Store

DAY0 = datetime(2026, 3, 5, tzinfo=UTC)
NOW = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
PRICES = {"big": (5.0, 50.0), "mid": (3.0, 30.0)}  # $/Mtok input, output
BOOK = PriceBook([Price("p", m, date(2025, 1, 1), i, o) for m, (i, o) in PRICES.items()])
IN_TOKENS, OUT_TOKENS = 1000, 100


def cost(model: str) -> float:
    i, o = PRICES[model]
    return (IN_TOKENS * i + OUT_TOKENS * o) / 1e6


class FileRoutes(Actuator):
    """Weights of the acme / bot / answer scope as one JSON file (real file writes)."""

    name = "file-routes"
    kinds = ("gateway.route",)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes = 0
        self.fail_apply = False

    def _text(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
        base = self._text()
        target = json.dumps(spec.params["weights"], sort_keys=True) + "\n"
        diff = "".join(
            difflib.unified_diff(
                base.splitlines(True), target.splitlines(True), "routes.json", "routes.json"
            )
        )
        return Plan(
            backend=self.name,
            spec=spec.as_dict(),
            expressible=True,
            description=f"weights {spec.params['weights']}",
            diff=diff,
            share=share,
            base={"text": base},
            target={"text": target},
        )

    def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
        live = self._text()
        if live == plan.target["text"]:
            return {"changed": False}
        if live != plan.base["text"]:
            raise ActuatorError("routes.json changed since the plan")
        if self.fail_apply:
            raise ActuatorError("reload failed: exit 1")
        self.path.write_text(plan.target["text"])
        self.writes += 1
        return {"changed": True}

    def observe(self, plan: Plan, action_id: str) -> Live:
        live = self._text()
        if live == plan.target["text"]:
            return "target"
        return "base" if live == plan.base["text"] else "other"

    def rollback(self, plan: Plan, action_id: str) -> dict[str, Any]:
        if self._text() != plan.base["text"]:
            self.path.write_text(plan.base["text"])
            self.writes += 1
        return {"restored": True}


class Sink:
    """Collects published events; ``down`` refuses them, as an unreachable broker would."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.down = False

    def send(self, key: str, value: dict[str, Any]) -> bool:
        if self.down:
            return False
        self.events.append(value)
        return True


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def insert(store: Store, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows)

    def work(con: Any) -> None:
        con.register("new_rows", table)
        con.execute("INSERT INTO usage_events BY NAME SELECT * FROM new_rows")
        con.unregister("new_rows")

    store.write(work)


def request(
    i: str, ts: datetime, model: str, quality: float | None, *, status: str = "ok", **kw: Any
) -> dict[str, Any]:
    c = cost(model) if not kw.get("cache_hit") else 0.0
    return {
        "event_id": i,
        "ts": ts,
        "provider": "p",
        "request_model": model,
        "input_tokens": IN_TOKENS,
        "output_tokens": OUT_TOKENS,
        "tenant": kw.get("tenant", "acme"),
        "app": kw.get("app", "bot"),
        "feature": kw.get("feature", "answer"),
        "latency_ms": 1000.0,
        "status": status,
        "latency_class": "interactive",
        "billing_mode": "standard",
        "quality_score": quality,
        "cache_hit": bool(kw.get("cache_hit", False)),
        "list_cost_usd": c,
        "cost_usd": c,
        "price_source": "cache_hit" if kw.get("cache_hit") else "catalog",
    }


def routed(
    tag: str, start: datetime, statuses: list[str], *, quality: float | None = None
) -> list[dict[str, Any]]:
    """Requests of the scope asked for ``big`` and answered by ``mid``, as a gateway logs
    them after a reroute: one a minute from ``start``, with these statuses."""
    rows = []
    for i, status in enumerate(statuses):
        row = request(f"{tag}{i}", start + timedelta(minutes=i), "mid", quality, status=status)
        row["request_model"], row["response_model"] = "big", "mid"
        rows.append(row)
    return rows


def history(store: Store) -> None:
    """Four days before NOW: the scope on big (600 requests, 0.95), mid beside it (1,000
    requests, 0.88: enough samples for a confident finding)."""
    rows = []
    for i in range(600):
        rows.append(request(f"b{i}", DAY0 + timedelta(minutes=9 * i), "big", 0.95))
    for i in range(1000):
        rows.append(request(f"m{i}", DAY0 + timedelta(minutes=5 * i + 2), "mid", 0.88))
    insert(store, rows)
    (result,) = run_analyzers(
        store, BOOK, build({"routing": {"min_monthly_savings_usd": 0.0}}, only=["routing"]), now=NOW
    )
    assert result.error is None, result.error


def serve(
    store: Store, routes: Path, n: int, start: datetime, *, mid_quality: float, tag: str
) -> dict[str, int]:
    """``n`` requests of the scope from ``start`` (one a minute), split by the weights the
    routes file holds now (stratified: the counts follow the weights exactly)."""
    weights = json.loads(routes.read_text()) if routes.exists() else {"big": 1.0}
    total = sum(weights.values())
    order = sorted(weights)
    counts: dict[str, int] = {m: 0 for m in order}
    rows = []
    for i in range(n):
        x, acc, model = (i + 0.5) / n, 0.0, order[-1]
        for m in order:
            acc += weights[m] / total
            if x < acc:
                model = m
                break
        counts[model] += 1
        q = mid_quality if model == "mid" else 0.95
        # as a gateway logs it: the model asked for, and the model that answered
        row = request(f"{tag}{i}", start + timedelta(minutes=i), model, q)
        row["request_model"], row["response_model"] = "big", model
        rows.append(row)
    insert(store, rows)
    return counts


def settings(**policy: Any) -> ActionsSettings:
    rule = {"mode": "auto", "max_share_step": 0.5, "max_steps_per_day": 10, **policy}
    return ActionsSettings.model_validate(
        {
            "policy": {"gateway.route": rule},
            "verify": {"canary_share": 0.1, "min_requests": 50},
        }
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Store, FileRoutes, Sink, Clock]]:
    with Store(tmp_path / "s.duckdb") as store:
        history(store)
        yield store, FileRoutes(tmp_path / "routes.json"), Sink(), Clock(NOW)


def controller(
    store: Store, routes: FileRoutes, sink: Sink, clock: Clock, s: ActionsSettings
) -> Controller:
    return Controller(store, s, BOOK, {"gateway.route": routes}, events=sink, clock=clock)


def the_finding(store: Store) -> dict[str, Any]:
    (finding,) = [f for f in stored_findings(store.cursor()) if f["kind"] == "routing.model_mix"]
    return finding


def test_the_routing_finding_is_the_one_the_tests_expect(world: Any) -> None:
    store, *_ = world
    f = the_finding(store)
    assert f["scope"] == {"tenant": "acme", "app": "bot", "feature": "answer", "model": "big"}
    assert f["action"] == {
        "actuator": "gateway.route",
        "params": {"match": f["scope"], "weights": {"mid": pytest.approx(1.0)}},
    }
    assert not f["provisional"] and f["confidence"] >= 0.5


def test_a_reroute_steps_up_through_canaries_to_verified(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.CANARY and action["share"] == pytest.approx(0.1)
    assert json.loads(routes.path.read_text()) == {"big": 0.9, "mid": 0.1}
    assert action["target_share"] == pytest.approx(1.0)
    served: dict[str, int] = {"big": 0, "mid": 0}
    shares = [0.1]
    for step in range(6):
        clock.now += timedelta(minutes=1)
        got = serve(store, routes.path, 500, clock.now, mid_quality=0.88, tag=f"s{step}-")
        for m, n in got.items():
            served[m] = served.get(m, 0) + n
        clock.now += timedelta(minutes=500)
        c.tick()
        action = c.get(action["id"])
        if action["state"] == State.VERIFIED:
            break
        shares.append(action["share"])
    assert action["state"] == State.VERIFIED, action["reason"]
    # 0.1 first (canary_share), then at most max_share_step (0.5) more per step
    assert shares == pytest.approx([0.1, 0.6, 1.0])
    assert json.loads(routes.path.read_text()) == {"mid": 1.0}
    steps = [a for a in c.audit(action["id"])]
    assert [a["to_state"] for a in steps] == [
        "proposed",
        "approved",
        "applying",
        "canary",
        "verifying",
        "applying",
        "canary",
        "verifying",
        "applying",
        "promoted",
        "verifying",
        "verified",
    ]
    assert all(a["diff"] for a in steps if a["to_state"] == "applying")
    # every transition was published, in order
    assert [e["seq"] for e in sink.events] == [a["seq"] for a in steps]
    assert [e["to"] for e in sink.events] == [a["to_state"] for a in steps]
    # the ledger: every request since the first step, priced as if on big (the mix before)
    (total,) = ledger.totals(store.cursor(), action["id"])
    assert total["requests"] == sum(served.values())
    expected_actual = served["big"] * cost("big") + served["mid"] * cost("mid")
    assert total["actual_usd"] == pytest.approx(expected_actual)
    assert total["counterfactual_usd"] == pytest.approx(sum(served.values()) * cost("big"))
    assert total["saved_usd"] == pytest.approx(served["mid"] * (cost("big") - cost("mid")))
    assert total["saved_low_usd"] <= total["saved_usd"] <= total["saved_high_usd"]


def test_a_quality_regression_rolls_back_to_the_original_bytes(world: Any) -> None:
    store, routes, sink, clock = world
    original = '{"big": 1.0}\n'
    routes.path.write_text(original)
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.CANARY
    clock.now += timedelta(minutes=1)
    serve(store, routes.path, 600, clock.now, mid_quality=0.60, tag="bad-")
    clock.now += timedelta(minutes=600)
    c.tick()
    action = c.get(action["id"])
    assert action["state"] == State.ROLLED_BACK
    assert "quality" in action["reason"] and "regression" in action["reason"]
    assert routes.path.read_text() == original
    verdict = json.loads(action["verdict"])
    assert not verdict["passed"]
    (q,) = [ch for ch in verdict["checks"] if ch["metric"] == "quality"]
    assert q["regressed"] and q["touched"] == pytest.approx(0.60)
    # a rolled-back finding is not proposed again
    c.tick()
    assert len(c.list()) == 1


def test_errors_after_the_switch_roll_back(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    clock.now += timedelta(minutes=1)
    insert(store, routed("x", clock.now, ["error"] * 60))
    clock.now += timedelta(minutes=100)
    c.tick()
    action = c.get(action["id"])
    assert action["state"] == State.ROLLED_BACK
    assert "error rate" in action["reason"]
    assert not routes.path.exists() or routes.path.read_text() == ""


def test_policy_off_suggest_and_provisional_never_apply(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings(mode="off"))
    c.tick()
    assert c.list() == []
    c = controller(store, routes, sink, clock, settings(mode="suggest"))
    for _ in range(3):
        c.tick()
    (action,) = c.list()
    assert action["state"] == State.PROPOSED and "suggest" in action["reason"]
    assert routes.writes == 0
    with pytest.raises(ActionError, match="not awaiting approval"):
        c.approve(action["id"], "U123")
    # a provisional finding is never proposed, whatever the policy
    store.write(lambda con: con.execute("DELETE FROM actions"))
    store.write(lambda con: con.execute("UPDATE findings SET provisional = true"))
    c = controller(store, routes, sink, clock, settings(mode="auto"))
    c.tick()
    assert c.list() == [] and routes.writes == 0


def test_approve_mode_waits_for_a_person_and_expires(world: Any) -> None:
    store, routes, sink, clock = world
    s = settings(mode="approve")
    s.approval_expiry_hours = 2
    c = controller(store, routes, sink, clock, s)
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.AWAITING_APPROVAL
    c.tick()
    assert routes.writes == 0
    clock.now += timedelta(hours=3)
    with pytest.raises(ActionError, match="expired"):
        c.approve(action["id"], "U123")
    assert c.get(action["id"])["state"] == State.EXPIRED
    # a new action for the same finding once the old one expired; approved, it applies
    c.tick()
    fresh = [a for a in c.list() if a["state"] == State.AWAITING_APPROVAL]
    assert len(fresh) == 1
    c.approve(fresh[0]["id"], "U123")
    c.tick()
    done = c.get(fresh[0]["id"])
    assert done["state"] == State.CANARY and done["approver"] == "U123"
    assert routes.writes == 1
    assert any(a["actor"] == "U123" for a in c.audit(done["id"]))


def test_auto_respects_the_money_limit_and_the_kill_switch(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings(max_auto_monthly_usd=0.01))
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.AWAITING_APPROVAL
    assert "max_auto_monthly_usd" in action["reason"]
    store.write(lambda con: con.execute("DELETE FROM actions"))
    s = settings()
    s.dry_run = True
    c = controller(store, routes, sink, clock, s)
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.PROPOSED and "dry run" in action["reason"]
    assert json.loads(action["plan"])["diff"]  # planned: the diff is there to see
    assert routes.writes == 0
    s.dry_run = False  # the switch back off: the next tick applies it
    c.tick()
    assert c.get(action["id"])["state"] == State.CANARY and routes.writes == 1


def test_auto_respects_actions_and_steps_per_day(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings(max_actions_per_day=0))
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.PROPOSED and "max_actions_per_day" in action["reason"]
    assert routes.writes == 0
    store.write(lambda con: con.execute("DELETE FROM actions"))
    c = controller(store, routes, sink, clock, settings(max_steps_per_day=1))
    c.tick()
    (action,) = c.list()
    clock.now += timedelta(minutes=1)
    serve(store, routes.path, 500, clock.now, mid_quality=0.88, tag="d1-")
    clock.now += timedelta(minutes=500)
    c.tick()
    held = c.get(action["id"])
    assert held["state"] == State.CANARY and "max_steps_per_day" in held["reason"]
    assert held["share"] == pytest.approx(0.1)
    clock.now = clock.now.replace(hour=0, minute=5) + timedelta(days=1)  # the next day
    c.tick()
    assert c.get(action["id"])["share"] == pytest.approx(0.6)


def test_a_failing_apply_rolls_back_and_says_why(world: Any) -> None:
    store, routes, sink, clock = world
    routes.fail_apply = True
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.ROLLED_BACK
    assert "reload failed" in action["reason"]


@pytest.mark.parametrize("crash_after_write", [True, False])
def test_a_crash_while_applying_is_reconciled_not_applied_twice(
    world: Any, crash_after_write: bool
) -> None:
    """The process died with the action recorded as applying: before the file was
    written, or after it (and before recording so). A new controller finishes it."""
    store, routes, sink, clock = world

    class Killed(BaseException):
        pass

    class Dying(FileRoutes):
        def apply(self, plan: Plan, action_id: str) -> dict[str, Any]:
            if crash_after_write:
                super().apply(plan, action_id)
            raise Killed

    dying = Dying(routes.path)
    with pytest.raises(Killed):
        Controller(store, settings(), BOOK, {"gateway.route": dying}, clock=clock).tick()
    (action,) = Controller(store, settings(), BOOK, {}, clock=clock).list()
    assert action["state"] == State.APPLYING
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    action = c.get(action["id"])
    assert action["state"] == State.CANARY
    assert json.loads(routes.path.read_text()) == {"big": 0.9, "mid": 0.1}
    assert dying.writes + routes.writes == 1
    applying = [a for a in c.audit(action["id"]) if a["to_state"] == "applying"]
    assert len(applying) == 1


def test_events_wait_in_the_outbox_while_the_broker_is_down(world: Any) -> None:
    store, routes, sink, clock = world
    sink.down = True
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    assert sink.events == []
    unpublished = (
        store.cursor().execute("SELECT count(*) FROM action_audit WHERE NOT published").fetchone()
    )
    assert unpublished is not None and unpublished[0] == len(c.audit(action["id"])) > 0
    sink.down = False
    c.tick()
    assert [e["to"] for e in sink.events] == [a["to_state"] for a in c.audit(action["id"])]
    assert all(e["action_id"] == action["id"] for e in sink.events)


def test_a_person_can_pause_and_roll_back(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    c.pause(action["id"], "alice")
    clock.now += timedelta(minutes=1)
    serve(store, routes.path, 500, clock.now, mid_quality=0.88, tag="p-")
    clock.now += timedelta(minutes=500)
    c.tick()
    assert c.get(action["id"])["share"] == pytest.approx(0.1)  # paused: no step
    c.pause(action["id"], "alice", paused=False)
    done = c.rollback(action["id"], "alice", "trying something else")
    assert done["state"] == State.ROLLED_BACK and "alice" in done["reason"]
    assert routes.path.read_text() == ""
    with pytest.raises(ActionError, match="nothing to roll back"):
        c.rollback(action["id"], "alice")


def test_response_cache_savings_are_the_hits_at_full_price(tmp_path: Path) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        start = NOW
        hits = [
            request(f"h{i}", start + timedelta(minutes=i), "big", None, cache_hit=True)
            for i in range(40)
        ]
        misses = [request(f"m{i}", start + timedelta(minutes=i), "big", None) for i in range(60)]
        other = [
            request(f"o{i}", start + timedelta(minutes=i), "big", None, cache_hit=True, app="x")
            for i in range(7)
        ]
        insert(store, hits + misses + other)
        scope = {"tenant": "acme", "app": "bot", "feature": "answer"}
        action = {
            "id": "a-1",
            "spec": {
                "actuator": "gateway.cache",
                "params": {"mode": "response", "ttl_s": 600, "scope": scope},
            },
            "scope": scope,
            "baseline": {},
            "applied_at": start,
            "ended_at": None,
        }
        (day,) = ledger.compute(store.cursor(), BOOK, action, now=NOW + timedelta(days=1))
    assert day.requests == 40 and day.actual_usd == 0.0
    assert day.counterfactual_usd == pytest.approx(40 * cost("big"))
    assert day.saved_low_usd == day.saved_high_usd == pytest.approx(day.saved_usd)


def test_a_few_failures_fail_a_canary_before_min_requests(world: Any) -> None:
    """A gateway that takes a failing deployment out of its picks leaves few touched
    requests: 6 of 6 failing already fail the step (min_requests is 50)."""
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = c.list()
    clock.now += timedelta(minutes=1)
    insert(store, routed("few", clock.now, ["error"] * 6))
    clock.now += timedelta(minutes=10)
    c.tick()
    action = c.get(action["id"])
    assert action["state"] == State.ROLLED_BACK, action["reason"]
    assert "error rate 100.0% of 6 touched requests" in action["reason"]
    # one failure in six is no evidence either way: the canary waits
    store.write(lambda con: con.execute("DELETE FROM actions"))
    routes.path.unlink()
    c = controller(store, routes, sink, clock, settings())
    c.tick()
    (action,) = [a for a in c.list() if a["state"] == State.CANARY]
    clock.now += timedelta(minutes=1)
    insert(store, routed("one", clock.now, ["error", "ok", "ok", "ok", "ok", "ok"], quality=0.88))
    clock.now += timedelta(minutes=10)
    c.tick()
    assert c.get(action["id"])["state"] == State.CANARY


def test_a_suggestion_goes_ahead_once_its_policy_becomes_auto(world: Any) -> None:
    store, routes, sink, clock = world
    c = controller(store, routes, sink, clock, settings(mode="suggest"))
    c.tick()
    (action,) = c.list()
    assert action["state"] == State.PROPOSED and action["mode"] == "suggest"
    c = controller(store, routes, sink, clock, settings(mode="auto"))
    c.tick()
    action = c.get(action["id"])
    assert action["state"] == State.CANARY and action["mode"] == "auto"
    assert routes.writes == 1


def test_a_target_that_cannot_be_read_delays_a_proposal_and_stops_nothing(world: Any) -> None:
    store, routes, sink, clock = world

    class Unreadable(FileRoutes):
        broken = True

        def plan(self, spec: ActionSpec, share: float | None, context: PlanContext) -> Plan:
            if self.broken:
                raise ActuatorError("cannot read routes.json: Permission denied")
            return super().plan(spec, share, context)

    actuator = Unreadable(routes.path)
    c = Controller(store, settings(), BOOK, {"gateway.route": actuator}, events=sink, clock=clock)
    assert c.tick()["proposed"] == 0 and c.list() == []
    actuator.broken = False
    c.tick()
    assert [a["state"] for a in c.list()] == [State.CANARY]
