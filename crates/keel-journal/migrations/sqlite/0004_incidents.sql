-- Alerting's record: one row per incident, and its timeline (crate::alert).
CREATE TABLE incidents (
    id TEXT PRIMARY KEY NOT NULL,
    rule TEXT NOT NULL,
    incident_key TEXT NOT NULL,
    severity TEXT NOT NULL,
    class TEXT,
    target TEXT,
    count INTEGER NOT NULL,
    triggered_at INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE INDEX incidents_by_state ON incidents (resolved_at, triggered_at);

CREATE TABLE incident_events (
    id INTEGER PRIMARY KEY,
    incident_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sink TEXT,
    action TEXT,
    detail TEXT
);
CREATE INDEX incident_events_by_incident ON incident_events (incident_id, id);
