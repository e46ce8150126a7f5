-- The journal (append-only), its projections, and coordination tables.
-- Times are milliseconds since the Unix epoch; JSON is stored as text.
CREATE TABLE journal_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE runs (
    run_id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    reason TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE INDEX runs_by_update ON runs (updated_at);
CREATE INDEX runs_by_state ON runs (state, updated_at);

CREATE TABLE steps (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error_class TEXT,
    message TEXT,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE attempts (
    run_id TEXT NOT NULL,
    started_seq INTEGER NOT NULL,
    step INTEGER NOT NULL,
    target TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT,
    latency_ms INTEGER,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    PRIMARY KEY (run_id, started_seq)
);
CREATE INDEX attempts_by_call ON attempts (run_id, step, target, attempt);

CREATE TABLE approvals (
    approval_id TEXT PRIMARY KEY NOT NULL,
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    tool TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    decided_by TEXT,
    decided_at INTEGER
);
CREATE INDEX approvals_by_run ON approvals (run_id);
CREATE INDEX approvals_by_status ON approvals (status, expires_at);

CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY NOT NULL,
    run_id TEXT NOT NULL,
    step INTEGER,
    class TEXT NOT NULL,
    summary TEXT NOT NULL,
    context TEXT NOT NULL,
    status TEXT NOT NULL,
    resolution TEXT,
    resolved_by TEXT,
    opened_at INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE INDEX tickets_by_run ON tickets (run_id);
CREATE INDEX tickets_by_status ON tickets (status);

CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    claimed_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

CREATE TABLE leases (
    run_id TEXT PRIMARY KEY NOT NULL,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL
);

CREATE TABLE gate_history (
    target TEXT NOT NULL,
    class TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (target, class, attempt)
);
