-- Hoomi hub schema, version 3: autovacuum reaches `messages` after a bounded number of
-- deletions, not after a fraction of the table.
-- A delete for everyone or a retention purge leaves the old row version (nonce, short
-- content) in the heap and long content in the TOAST table until VACUUM removes it. The
-- default trigger, 20 % of the table dead, may never come for a large message store.
-- With a scale factor of 0, autovacuum vacuums each of them once 200 row versions there
-- are dead, at its next round (autovacuum_naptime, 1 min by default). The hub's own
-- erasure job (storage/erasure.py) covers the deletions below that count.
ALTER TABLE messages SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    toast.autovacuum_vacuum_scale_factor = 0,
    toast.autovacuum_vacuum_threshold = 200
);
