"""The one state machine every action goes through.

::

    proposed ─▶ awaiting_approval ─▶ approved ─▶ applying ─▶ canary ─▶ verifying ─┐
       │               └▶ rejected | expired        ▲                         │   │
       └▶ suppressed                                └──── the next step ──────┘   │
                                                                                  ▼
    promoted ─▶ verifying ─▶ verified          any live state ─▶ rolling_back ─▶ rolled_back
                                                                             └─▶ failed

(``TRANSITIONS`` below is the whole of it.)

- ``proposed``: born from an eligible finding. A ``suggest`` policy leaves it here
  (a person carries it out); it is ``suppressed`` when its finding goes away.
- ``applying``: a step's change is being made live (the plan is recorded first, so a
  crash here is reconciled at start-up by observing the live target).
- ``canary``: a step short of the target share is live, collecting requests.
- ``verifying``: enough requests: the step is judged (a pass steps up: ``applying``
  again; the last step passing: ``promoted``).
- ``promoted``: the target is live; ``verified`` once the full change has been judged.
- ``rolling_back`` ends in ``rolled_back`` (the configuration before restored) or
  ``failed`` (it could not be: a person must look).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PROPOSED = "proposed"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    APPLYING = "applying"
    CANARY = "canary"
    VERIFYING = "verifying"
    PROMOTED = "promoted"
    VERIFIED = "verified"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.PROPOSED: frozenset({S.AWAITING_APPROVAL, S.APPROVED, S.SUPPRESSED}),
    S.AWAITING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.EXPIRED, S.SUPPRESSED}),
    S.APPROVED: frozenset({S.APPLYING, S.SUPPRESSED}),
    S.APPLYING: frozenset({S.CANARY, S.PROMOTED, S.ROLLING_BACK, S.FAILED}),
    S.CANARY: frozenset({S.VERIFYING, S.ROLLING_BACK}),
    S.VERIFYING: frozenset({S.APPLYING, S.PROMOTED, S.VERIFIED, S.ROLLING_BACK}),
    S.PROMOTED: frozenset({S.VERIFYING, S.ROLLING_BACK}),
    S.VERIFIED: frozenset({S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK, S.FAILED}),
    S.REJECTED: frozenset(),
    S.EXPIRED: frozenset(),
    S.SUPPRESSED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    S.FAILED: frozenset(),
}

#: Not yet changing the world: a new finding for the same scope replaces these.
PENDING = frozenset({S.PROPOSED, S.AWAITING_APPROVAL, S.APPROVED})
#: The change is (or may be) live: the ledger counts, a rollback is possible.
LIVE = frozenset({S.APPLYING, S.CANARY, S.VERIFYING, S.PROMOTED, S.VERIFIED, S.ROLLING_BACK})
#: Nothing more happens to these.
FINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class IllegalTransition(ValueError):
    """A transition the state machine does not allow; the message names both states."""


def check(current: State, target: State) -> None:
    """Raise ``IllegalTransition`` unless ``current -> target`` is allowed."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none: it is final"
        raise IllegalTransition(
            f"an action in {current} cannot go to {target} (from {current}: {allowed})"
        )
