"""``/v1/actions``: the controller's actions, their plans, approvals and savings.

Reads follow ``api.public_reads``; every ``POST`` needs the token. The body of a
``POST`` names the person (``actor``), who is recorded in the audit trail.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from finopsd.actions import views
from finopsd.actions.controller import ActionError, Controller, UnknownAction
from finopsd.actions.lifecycle import State

reads = APIRouter(prefix="/v1", tags=["actions"])
writes = APIRouter(prefix="/v1", tags=["actions"])


def controller(request: Request) -> Controller:
    found = request.app.state.service.controller
    if found is None:
        raise HTTPException(503, "actions are disabled (actions.enabled = false)")
    return found


Ctl = Annotated[Controller, Depends(controller)]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str = Field(min_length=1, max_length=200, description="who decides (recorded)")
    reason: str = Field("", max_length=2000)


class Pause(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str = Field(min_length=1, max_length=200)
    paused: bool = True


@reads.get("/actions", summary="actions, the newest first")
def list_actions(
    ctl: Ctl,
    state: Annotated[State | None, Query(description="only those in this state")] = None,
    finding_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    rows = ctl.list(state=state.value if state else None, finding_id=finding_id)
    return {"total": len(rows), "actions": [views.action(r) for r in rows]}


@reads.get("/actions/savings", summary="realised savings per action, from the ledger")
def savings(ctl: Ctl) -> dict[str, Any]:
    return views.savings(ctl.store.cursor())


@reads.get("/actions/{action_id}", summary="one action, its audit trail and its savings")
def get_action(ctl: Ctl, action_id: str) -> dict[str, Any]:
    try:
        row = ctl.get(action_id)
    except UnknownAction as exc:
        raise HTTPException(404, str(exc)) from None
    return views.detail(ctl.store.cursor(), row, ctl.audit(action_id))


@reads.get("/findings/{finding_id}/plan", summary="the first step a finding's action would take")
def plan(ctl: Ctl, finding_id: str) -> dict[str, Any]:
    try:
        return ctl.plan(finding_id).as_dict()
    except UnknownAction as exc:
        raise HTTPException(404, str(exc)) from None


def _decide(call: Any, action_id: str, *args: Any) -> dict[str, Any]:
    try:
        return views.action(call(action_id, *args))
    except UnknownAction as exc:
        raise HTTPException(404, str(exc)) from None
    except ActionError as exc:
        raise HTTPException(409, str(exc)) from None


@writes.post("/actions/{action_id}/approve", summary="approve an action awaiting approval")
def approve(ctl: Ctl, action_id: str, body: Decision) -> dict[str, Any]:
    return _decide(ctl.approve, action_id, body.actor)


@writes.post("/actions/{action_id}/reject", summary="reject a proposed or awaiting action")
def reject(ctl: Ctl, action_id: str, body: Decision) -> dict[str, Any]:
    return _decide(ctl.reject, action_id, body.actor, body.reason)


@writes.post("/actions/{action_id}/rollback", summary="roll a live action back now")
def rollback(ctl: Ctl, action_id: str, body: Decision) -> dict[str, Any]:
    return _decide(ctl.rollback, action_id, body.actor, body.reason)


@writes.post("/actions/{action_id}/pause", summary="hold an action where it is (or resume it)")
def pause(ctl: Ctl, action_id: str, body: Pause) -> dict[str, Any]:
    return _decide(ctl.pause, action_id, body.actor, body.paused)
