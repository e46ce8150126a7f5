-- Queries that do not grow with history: ended attempts counted per (target, hour,
-- outcome) for the dashboard's window, filled from the attempts so far.
CREATE TABLE attempt_hours (
    target TEXT NOT NULL,
    hour BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (target, hour, outcome)
);
INSERT INTO attempt_hours (target, hour, outcome, n)
SELECT target, ended_at - (ended_at % 3600000), outcome, COUNT(*) FROM attempts
WHERE outcome IS NOT NULL AND ended_at IS NOT NULL
GROUP BY target, ended_at - (ended_at % 3600000), outcome;
