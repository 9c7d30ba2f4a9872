-- Hoomi hub schema, version 2: an upper bound on retention_seconds.
-- Without it, a huge value (10^12 s) makes the purge's `now() - make_interval(...)` fall
-- outside PostgreSQL's timestamp range and the purge query fails. 100 years keeps every
-- message any client will ever ask about; storage/hoomis.py refuses more with `invalid`.

-- Clamp any value stored before this bound existed, or adding the CHECK would fail.
UPDATE hoomis SET retention_seconds = 3153600000 WHERE retention_seconds > 3153600000;

ALTER TABLE hoomis ADD CONSTRAINT hoomis_retention_cap
    CHECK (retention_seconds IS NULL OR retention_seconds <= 3153600000);
