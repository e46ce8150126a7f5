-- The journal (append-only), its projections, and coordination tables.
-- Times are milliseconds since the Unix epoch; JSON is stored as text.
CREATE TABLE journal_events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    schema_version BIGINT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE runs (
    run_id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_seq BIGINT NOT NULL
);
CREATE INDEX runs_by_update ON runs (updated_at);
CREATE INDEX runs_by_state ON runs (state, updated_at);

CREATE TABLE steps (
    run_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error_class TEXT,
    message TEXT,
    started_at BIGINT NOT NULL,
    finished_at BIGINT,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE attempts (
    run_id TEXT NOT NULL,
    started_seq BIGINT NOT NULL,
    step BIGINT NOT NULL,
    target TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    outcome TEXT,
    latency_ms BIGINT,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    PRIMARY KEY (run_id, started_seq)
);
CREATE INDEX attempts_by_call ON attempts (run_id, step, target, attempt);

CREATE TABLE approvals (
    approval_id TEXT PRIMARY KEY NOT NULL,
    run_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    tool TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    decided_by TEXT,
    decided_at BIGINT
);
CREATE INDEX approvals_by_run ON approvals (run_id);
CREATE INDEX approvals_by_status ON approvals (status, expires_at);

CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY NOT NULL,
    run_id TEXT NOT NULL,
    step BIGINT,
    class TEXT NOT NULL,
    summary TEXT NOT NULL,
    context TEXT NOT NULL,
    status TEXT NOT NULL,
    resolution TEXT,
    resolved_by TEXT,
    opened_at BIGINT NOT NULL,
    resolved_at BIGINT
);
CREATE INDEX tickets_by_run ON tickets (run_id);
CREATE INDEX tickets_by_status ON tickets (status);

CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    claimed_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

CREATE TABLE leases (
    run_id TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL
);

CREATE TABLE gate_history (
    target TEXT NOT NULL,
    class TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    successes BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    PRIMARY KEY (target, class, attempt)
);
