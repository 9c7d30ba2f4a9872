-- The erasure job's rewrites (storage/erasure.py): for each partition of `messages`, the
-- statistics' count of updated and deleted rows when it was last rewritten (VACUUM
-- FULL), so a partition is rewritten again only after more erasures, at most once per
-- HOOMI_ERASE_REWRITE_S. No Hoomi data here: a small local table, also under Citus.
CREATE TABLE erasure_rewrites (
    partition     TEXT PRIMARY KEY,
    changes       BIGINT NOT NULL,
    rewritten_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
