-- Hoomi hub schema, version 7: messages that change (issue 10; SPEC §7.2).
--
-- * `scheme`: the client's encryption scheme version of the stored ciphertext (1-255).
--   `reencrypt` only ever raises it; `history`/`sync` filter on it (`scheme_below`).
-- * The nonce-reuse guard: no two messages of a Hoomi share (session_id, nonce), enforced
--   by a unique index (hoomi_id leads, Citus' rule). The writer checks it first so that a
--   reused nonce is a per-row `invalid` naming `nonce`; the index is what makes it hold
--   for edits and reencryptions racing a send, and for every replica.
--   Tombstones (nonce NULL) and archived rows (nonce in a segment) are outside it:
--   NULLs are distinct. docs/encryption.md says what that leaves to the client.
-- * `message_tokens`: the blind-index search tokens of each live message, one row per
--   (token, message). They go with their message: ON DELETE CASCADE covers retention's
--   purge and a Hoomi's deletion; delete for everyone and edit remove them explicitly.

-- On an install upgraded from before 0004 whose copy of messages has not finished yet,
-- `messages` is still the old table (all the data, and the previous release's replicas
-- writing to it) and `messages_partitioned` the one the swap renames to `messages`:
-- this release serves only after the swap (storage/migrate.py), so the guard, the
-- scheme and the tokens' foreign key go on the table that will be `messages`; the old
-- one gets the scheme column too, so both keep the same shape. The copy and the mirror
-- trigger name their 11 columns: scheme stays at its default there.
DO $$
DECLARE
    target text := CASE WHEN to_regclass('messages_partitioned') IS NULL THEN 'messages'
                        ELSE 'messages_partitioned' END;
    t text;
    n bigint;
BEGIN
    FOREACH t IN ARRAY ARRAY['messages', 'messages_partitioned'] LOOP
        CONTINUE WHEN to_regclass(t) IS NULL;
        EXECUTE format('ALTER TABLE %I ADD COLUMN scheme SMALLINT NOT NULL DEFAULT 1 '
                       'CONSTRAINT messages_scheme_range CHECK (scheme BETWEEN 1 AND 255)', t);
    END LOOP;
    -- Rows stored before the guard may already reuse a nonce (they are all in
    -- `messages`, copied or not): the index cannot hold over them, and silently dropping
    -- either message is not ours to decide. Say which.
    SELECT count(*) INTO n FROM (
        SELECT 1 FROM messages WHERE nonce IS NOT NULL
        GROUP BY hoomi_id, session_id, nonce HAVING count(*) > 1) d;
    IF n > 0 THEN
        RAISE EXCEPTION '% (hoomi_id, session_id, nonce) triples are already used by several '
            'messages; list them with: SELECT hoomi_id, session_id, nonce, array_agg(seq) '
            'FROM messages WHERE nonce IS NOT NULL GROUP BY 1, 2, 3 HAVING count(*) > 1 '
            '(docs/storage.md, "Nonce guard")', n;
    END IF;
    EXECUTE format('CREATE UNIQUE INDEX idx_messages_nonce ON %I (hoomi_id, session_id, nonce)',
                   target);
    EXECUTE format($tokens$
        CREATE TABLE message_tokens (
            hoomi_id  UUID NOT NULL,
            token     BYTEA NOT NULL CONSTRAINT message_tokens_token_len
                          CHECK (octet_length(token) BETWEEN 8 AND 32),
            seq       BIGINT NOT NULL,
            -- A search walks (hoomi_id, token) newest seq first: an index-only scan.
            CONSTRAINT message_tokens_pkey PRIMARY KEY (hoomi_id, token, seq),
            CONSTRAINT message_tokens_message_fkey FOREIGN KEY (hoomi_id, seq)
                REFERENCES %I (hoomi_id, seq) ON DELETE CASCADE
        )
    $tokens$, target);
END $$;

-- The cascade's and the explicit erasure's lookup: a message's tokens.
CREATE INDEX message_tokens_by_message ON message_tokens (hoomi_id, seq);
ALTER TABLE message_tokens SET (autovacuum_vacuum_scale_factor = 0,
                                autovacuum_vacuum_threshold = 1000);
