-- The structure hash (keys and types) of a succeeded step's output, journaled beside it
-- by agent runs (NULL for other steps, and for steps finished before it was recorded).
ALTER TABLE steps ADD COLUMN shape TEXT;
