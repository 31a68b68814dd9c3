"""The actions' tables (applied by the store's migration runner; see ``finopsd.store``).

- ``actions``: one row per action, its current state (rewritten on each transition).
- ``action_audit``: append-only, one row per transition: who, when, from, to, why,
  the plan's diff and details. ``published`` is the outbox flag: false until the
  row has been sent to the ``finopsd.actions`` topic, so a crash between the store's
  commit and the send loses no event (the row is sent again on start; consumers see
  ``seq`` and can drop a repeat).
- ``savings_ledger``: per action and UTC day, what the touched requests cost and what
  the same requests would have cost under the configuration before the action.
- ``slack_messages`` (``SLACK_TABLES``, a later migration): what was posted to Slack about
  each action, and whether Slack took it (``finopsd.actions.slack``): the announcement of
  a transition (``audit_seq``, so a transition the outbox sends again is not posted twice)
  and the answers to clicks (``slack_user``).
"""

ACTIONS_TABLES = """
CREATE TABLE actions (
    id VARCHAR PRIMARY KEY,
    finding_id VARCHAR NOT NULL,
    finding_kind VARCHAR NOT NULL,
    actuator VARCHAR NOT NULL,        -- the ActionSpec's kind, e.g. gateway.route
    backend VARCHAR NOT NULL,         -- the actuator plug-in that carries it out
    tenant VARCHAR,
    scope JSON NOT NULL,
    spec JSON NOT NULL,
    mode VARCHAR NOT NULL,            -- the policy's mode when proposed
    state VARCHAR NOT NULL,
    paused BOOLEAN NOT NULL,
    dry_run BOOLEAN NOT NULL,
    monthly_savings_usd DOUBLE NOT NULL,
    monthly_savings_low_usd DOUBLE NOT NULL,
    monthly_savings_high_usd DOUBLE NOT NULL,
    confidence DOUBLE NOT NULL,
    target_share DOUBLE,              -- traffic the change moves at the end (NULL: none)
    share DOUBLE,                     -- traffic moved by the live step
    step INTEGER NOT NULL,            -- steps applied so far
    plan JSON,                        -- the live (or last) step's plan
    baseline JSON,                    -- the configuration before the action
    verdict JSON,                     -- the latest verification
    reason VARCHAR NOT NULL,          -- why it is in its state
    approver VARCHAR,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ,           -- awaiting approval until
    step_started_at TIMESTAMPTZ,      -- the live step's change time
    applied_at TIMESTAMPTZ,           -- the first step's change time (ledger start)
    ended_at TIMESTAMPTZ              -- rolled back / failed (ledger end)
);
CREATE TABLE action_audit (
    seq BIGINT PRIMARY KEY,
    action_id VARCHAR NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    from_state VARCHAR,
    to_state VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    diff VARCHAR,
    detail JSON,
    published BOOLEAN NOT NULL
);
CREATE TABLE savings_ledger (
    action_id VARCHAR NOT NULL,
    day DATE NOT NULL,
    requests BIGINT NOT NULL,
    actual_usd DOUBLE NOT NULL,
    counterfactual_usd DOUBLE NOT NULL,
    saved_usd DOUBLE NOT NULL,
    saved_low_usd DOUBLE NOT NULL,
    saved_high_usd DOUBLE NOT NULL,
    unpriced BIGINT NOT NULL,         -- touched requests no counterfactual could price
    method VARCHAR NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (action_id, day)
);
"""

SLACK_TABLES = """
CREATE TABLE slack_messages (
    action_id VARCHAR NOT NULL,
    audit_seq BIGINT,                 -- the transition announced; NULL: an answer to a click
    kind VARCHAR NOT NULL,            -- approval | update | decision | refusal
    via VARCHAR NOT NULL,             -- webhook | response_url
    slack_user VARCHAR,               -- who clicked (answers to a click)
    posted_at TIMESTAMPTZ NOT NULL,
    ok BOOLEAN NOT NULL,              -- Slack took it
    error VARCHAR                     -- why not (never the URL)
);
"""
