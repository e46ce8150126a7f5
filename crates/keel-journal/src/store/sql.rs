//! The statements both dialects share, in one place to read them side by side.
//!
//! Times are milliseconds since the Unix epoch; JSON is stored as text.

/// Counts `$3` more events of run `$1` at time `$2` (creating its row on its first
/// event) and returns the run's last sequence number.
pub(crate) const TOUCH_RUN: &str = "\
INSERT INTO runs (run_id, name, state, input, reason, created_at, updated_at, last_seq) \
VALUES ($1, '', 'created', 'null', NULL, $2, $2, $3) \
ON CONFLICT (run_id) DO UPDATE SET updated_at = excluded.updated_at, last_seq = runs.last_seq + excluded.last_seq \
RETURNING last_seq";

/// As [`TOUCH_RUN`], for replay: sets the last sequence number to `$3`.
pub(crate) const TOUCH_RUN_ABSOLUTE: &str = "\
INSERT INTO runs (run_id, name, state, input, reason, created_at, updated_at, last_seq) \
VALUES ($1, '', 'created', 'null', NULL, $2, $2, $3) \
ON CONFLICT (run_id) DO UPDATE SET updated_at = excluded.updated_at, last_seq = excluded.last_seq";

/// Creates run `$1`'s row at `$2` with no events yet, unless it exists; returns the id
/// only when this statement created it.
pub(crate) const CREATE_RUN: &str = "\
INSERT INTO runs (run_id, name, state, input, reason, created_at, updated_at, last_seq) \
VALUES ($1, '', 'created', 'null', NULL, $2, $2, 0) \
ON CONFLICT (run_id) DO NOTHING RETURNING run_id";

/// The events of run `$1` after sequence `$2`, at most `$3`.
pub(crate) const EVENTS_OF_RUN: &str = "\
SELECT run_id, seq, schema_version, payload, recorded_at FROM journal_events \
WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// A page of all events after (`$1`, `$2`), for replay.
pub(crate) const EVENTS_PAGE: &str = "\
SELECT run_id, seq, schema_version, payload, recorded_at FROM journal_events \
WHERE run_id > $1 OR (run_id = $1 AND seq > $2) ORDER BY run_id, seq LIMIT 1000";

pub(crate) const STEP_STARTED: &str = "\
INSERT INTO steps (run_id, step, name, target, status, input, output, error_class, message, started_at, finished_at) \
VALUES ($1, $2, $3, $4, 'running', $5, NULL, NULL, NULL, $6, NULL) \
ON CONFLICT (run_id, step) DO UPDATE SET name = excluded.name, target = excluded.target, status = 'running', \
input = excluded.input, output = NULL, error_class = NULL, message = NULL, shape = NULL, \
started_at = excluded.started_at, finished_at = NULL";

pub(crate) const STEP_FINISHED: &str = "\
INSERT INTO steps (run_id, step, name, target, status, input, output, error_class, message, started_at, finished_at, shape) \
VALUES ($1, $2, '', '', $3, 'null', $4, $5, $6, $7, $7, $8) \
ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status, output = excluded.output, \
error_class = excluded.error_class, message = excluded.message, finished_at = excluded.finished_at, \
shape = excluded.shape";

/// A step that started and finished within one batch, written once.
pub(crate) const STEP_ROW: &str = "\
INSERT INTO steps (run_id, step, name, target, status, input, output, error_class, message, started_at, finished_at, shape) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11) \
ON CONFLICT (run_id, step) DO UPDATE SET name = excluded.name, target = excluded.target, status = excluded.status, \
input = excluded.input, output = excluded.output, error_class = excluded.error_class, message = excluded.message, \
started_at = excluded.started_at, finished_at = excluded.finished_at, shape = excluded.shape";

/// Closes an attempt that never ended (its process died) as `abandoned`.
pub(crate) const ATTEMPT_ABANDONED: &str = "\
UPDATE attempts SET outcome = 'abandoned', ended_at = $5 \
WHERE run_id = $1 AND step = $2 AND target = $3 AND attempt = $4 AND ended_at IS NULL";

pub(crate) const ATTEMPT_STARTED: &str = "\
INSERT INTO attempts (run_id, started_seq, step, target, attempt, outcome, latency_ms, started_at, ended_at) \
VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, NULL)";

/// Ends the latest open attempt matching (run, step, target, attempt).
pub(crate) const ATTEMPT_ENDED: &str = "\
UPDATE attempts SET outcome = $5, latency_ms = $6, ended_at = $7 \
WHERE run_id = $1 AND started_seq = (SELECT MAX(started_seq) FROM attempts \
WHERE run_id = $1 AND step = $2 AND target = $3 AND attempt = $4 AND outcome IS NULL)";

/// An `attempt_ended` whose start was never seen.
pub(crate) const ATTEMPT_ENDED_ALONE: &str = "\
INSERT INTO attempts (run_id, started_seq, step, target, attempt, outcome, latency_ms, started_at, ended_at) \
VALUES ($1, $8, $2, $3, $4, $5, $6, $7, $7)";

pub(crate) const APPROVAL_REQUESTED: &str = "\
INSERT INTO approvals (approval_id, run_id, step, tool, args_digest, status, requested_at, expires_at, decided_by, decided_at, args) \
VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, NULL, NULL, $8) \
ON CONFLICT (approval_id) DO UPDATE SET run_id = excluded.run_id, step = excluded.step, tool = excluded.tool, \
args_digest = excluded.args_digest, args = excluded.args, status = 'pending', requested_at = excluded.requested_at, \
expires_at = excluded.expires_at, decided_by = NULL, decided_at = NULL";

pub(crate) const APPROVAL_DECIDED: &str =
    "UPDATE approvals SET status = $2, decided_by = $3, decided_at = $4 WHERE approval_id = $1";

pub(crate) const TICKET_OPENED: &str = "\
INSERT INTO tickets (ticket_id, run_id, step, class, summary, context, status, resolution, resolved_by, opened_at, resolved_at) \
VALUES ($1, $2, $3, $4, $5, $6, 'open', NULL, NULL, $7, NULL) \
ON CONFLICT (ticket_id) DO UPDATE SET run_id = excluded.run_id, step = excluded.step, class = excluded.class, \
summary = excluded.summary, context = excluded.context, status = 'open', resolution = NULL, resolved_by = NULL, \
opened_at = excluded.opened_at, resolved_at = NULL";

pub(crate) const TICKET_RESOLVED: &str = "UPDATE tickets SET status = 'resolved', resolution = $2, resolved_by = $3, resolved_at = $4 WHERE ticket_id = $1";

/// Claims key `$1` with token `$2` at `$3` until `$4`: wins if the key is new, expired,
/// or already ours (a retried claim whose first try committed).
pub(crate) const CLAIM: &str = "\
INSERT INTO idempotency_keys (key, token, state, result, claimed_at, expires_at) \
VALUES ($1, $2, 'in_progress', NULL, $3, $4) \
ON CONFLICT (key) DO UPDATE SET token = excluded.token, state = 'in_progress', result = NULL, \
claimed_at = excluded.claimed_at, expires_at = excluded.expires_at \
WHERE idempotency_keys.expires_at <= $3 OR idempotency_keys.token = $2 \
RETURNING token";

/// Takes over key `$1`'s in-progress claim with token `$2` at `$3` until `$4`,
/// whoever held it (the caller knows the holder is dead: it holds the run's lease).
pub(crate) const TAKE_OVER_CLAIM: &str = "\
UPDATE idempotency_keys SET token = $2, claimed_at = $3, expires_at = $4 \
WHERE key = $1 AND (state = 'in_progress' OR token = $2) RETURNING token";

pub(crate) const CLAIM_LOOKUP: &str = "SELECT state, result, expires_at FROM idempotency_keys WHERE key = $1";

pub(crate) const COMPLETE_CLAIM: &str = "\
UPDATE idempotency_keys SET state = 'done', result = $3, expires_at = $4 WHERE key = $1 AND token = $2";

/// Takes run `$1`'s lease for `$2` until `$3` if it is free, expired at `$4`, or `$2`'s.
pub(crate) const ACQUIRE_LEASE: &str = "\
INSERT INTO leases (run_id, owner, epoch, expires_at, acquired_at) VALUES ($1, $2, 1, $3, $4) \
ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, epoch = leases.epoch + 1, \
expires_at = excluded.expires_at, acquired_at = excluded.acquired_at \
WHERE leases.expires_at <= $4 OR leases.owner = $2 \
RETURNING epoch";

/// Unfinished runs with no live lease at `$1`, at most `$2`, oldest activity first.
/// A run with no name is not a plan's (the gateway's run, an agent's run that model
/// calls are journaled under): there is nothing to drive, so it is never claimed (it
/// would be claimed, fail and be claimed again ahead of every other run).
pub(crate) const CLAIM_CANDIDATES: &str = "\
SELECT r.run_id FROM runs r LEFT JOIN leases l ON l.run_id = r.run_id \
WHERE r.state IN ('created', 'running') AND r.name <> '' AND (l.run_id IS NULL OR l.expires_at <= $1) \
ORDER BY r.updated_at, r.run_id LIMIT $2";

/// Adds outcomes, saturating at the largest integer (a sum never overflows into a REAL
/// on SQLite or an error on PostgreSQL; a REAL left by an older build heals to it).
pub(crate) const ADD_GATE: &str = "\
INSERT INTO gate_history (target, class, attempt, successes, failures) VALUES ($1, $2, $3, $4, $5) \
ON CONFLICT (target, class, attempt) DO UPDATE SET \
successes = CASE WHEN gate_history.successes > 9223372036854775807 - excluded.successes \
THEN 9223372036854775807 ELSE gate_history.successes + excluded.successes END, \
failures = CASE WHEN gate_history.failures > 9223372036854775807 - excluded.failures \
THEN 9223372036854775807 ELSE gate_history.failures + excluded.failures END";

/// A page of runs before cursor (`$1` updated_at, `$2` run id), newest first, at most `$3`.
pub(crate) const RUNS_PAGE: &str = "\
SELECT * FROM runs WHERE updated_at < $1 OR (updated_at = $1 AND run_id < $2) \
ORDER BY updated_at DESC, run_id DESC LIMIT $3";

/// As [`RUNS_PAGE`], of runs in state `$1`.
pub(crate) const RUNS_PAGE_IN_STATE: &str = "\
SELECT * FROM runs WHERE state = $1 AND (updated_at < $2 OR (updated_at = $2 AND run_id < $3)) \
ORDER BY updated_at DESC, run_id DESC LIMIT $4";

/// Adds `$4` ended attempts of target `$1` with outcome `$3` to hour `$2`.
pub(crate) const COUNT_HOUR: &str = "\
INSERT INTO attempt_hours (target, hour, outcome, n) VALUES ($1, $2, $3, $4) \
ON CONFLICT (target, hour, outcome) DO UPDATE SET n = attempt_hours.n + excluded.n";

/// Attempts and failed attempts per target in the hours since `$1` (`abandoned` counts as failed).
pub(crate) const ATTEMPTS_BY_TARGET: &str = "\
SELECT target, CAST(SUM(n) AS BIGINT) AS calls, CAST(SUM(CASE WHEN outcome <> 'ok' THEN n ELSE 0 END) AS BIGINT) AS errors \
FROM attempt_hours WHERE hour >= $1 GROUP BY target ORDER BY target";

/// Failed attempts per class (outcome) per hour since `$1`.
pub(crate) const ERRORS_BY_HOUR: &str = "\
SELECT outcome, hour, n FROM attempt_hours WHERE hour >= $1 AND outcome <> 'ok' ORDER BY hour, outcome";

/// Retries (attempts after the first) of the 30 most recently active runs that had any.
pub(crate) const RETRIES_BY_RUN: &str = "\
SELECT a.run_id AS run_id, COUNT(*) AS retries FROM attempts a \
WHERE a.run_id IN (SELECT run_id FROM runs ORDER BY updated_at DESC LIMIT 30) AND a.attempt > 1 \
GROUP BY a.run_id";

/// Gives up lease (`$1` run, `$2` owner, `$3` epoch), if still held at that epoch.
pub(crate) const RELEASE_LEASE: &str = "DELETE FROM leases WHERE run_id = $1 AND owner = $2 AND epoch = $3";

/// The previous holder of a run's lease, before an acquisition.
pub(crate) const LEASE_HOLDER: &str = "SELECT owner FROM leases WHERE run_id = $1";
