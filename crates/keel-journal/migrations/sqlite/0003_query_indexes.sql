-- The dashboard's window over attempts, and the runs listed by state.
CREATE INDEX attempts_by_start ON attempts (started_at);
