-- Alerting's record: one row per incident, and its timeline (crate::alert).
CREATE TABLE incidents (
    id TEXT PRIMARY KEY NOT NULL,
    rule TEXT NOT NULL,
    incident_key TEXT NOT NULL,
    severity TEXT NOT NULL,
    class TEXT,
    target TEXT,
    count BIGINT NOT NULL,
    triggered_at BIGINT NOT NULL,
    resolved_at BIGINT
);
CREATE INDEX incidents_by_state ON incidents (resolved_at, triggered_at);

CREATE TABLE incident_events (
    id BIGSERIAL PRIMARY KEY,
    incident_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    sink TEXT,
    action TEXT,
    detail TEXT
);
CREATE INDEX incident_events_by_incident ON incident_events (incident_id, id);
