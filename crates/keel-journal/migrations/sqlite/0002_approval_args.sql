-- The arguments an approval covers, shown to the person deciding it (NULL for
-- approvals requested before they were recorded).
ALTER TABLE approvals ADD COLUMN args TEXT;
