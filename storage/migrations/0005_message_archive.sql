-- Hoomi hub schema, version 5: the message archive (issue 9, part 2; SPEC §7.1).
--
-- Old messages' ciphertext moves to immutable segment objects in object storage
-- (HOOMI_ARCHIVE_URL); their rows stay here with every column but content and nonce.
-- storage/archive.py owns the segment format and the order of operations; see
-- docs/storage.md, "The archive".

-- An archived row: content and nonce NULL, not deleted, content_len = the ciphertext's
-- length (byte-bounded pages still count it). NULL on every other row.
-- On an install upgraded from before 0004 whose copy of messages has not finished yet,
-- `messages` is still the old table and `messages_partitioned` the one that the swap
-- renames to `messages`: both get the column and the constraint (the copy and the
-- mirror trigger name their 11 columns, so the new one stays NULL there).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['messages', 'messages_partitioned'] LOOP
        CONTINUE WHEN to_regclass(t) IS NULL;
        EXECUTE format('ALTER TABLE %I ADD COLUMN content_len INTEGER', t);
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT messages_tombstone_erased', t);
        EXECUTE format($check$
            ALTER TABLE %I ADD CONSTRAINT messages_tombstone_erased CHECK (
                -- live, in the table
                (deleted_at IS NULL AND content IS NOT NULL AND nonce IS NOT NULL
                 AND content_len IS NULL)
                -- live, archived: the ciphertext and nonce are in a segment object
                OR (deleted_at IS NULL AND content IS NULL AND nonce IS NULL
                    AND content_len IS NOT NULL)
                -- deleted for everyone: a tombstone
                OR (deleted_at IS NOT NULL AND content IS NULL AND nonce IS NULL
                    AND session_id IS NULL AND content_len IS NULL))
        $check$, t);
    END LOOP;
END $$;

-- Every message with seq <= archived_upto is archived, a tombstone or purged; NULL: none.
ALTER TABLE hoomis ADD COLUMN archived_upto BIGINT CHECK (archived_upto >= 0);

-- One row per segment object: the Hoomi's live messages with first_seq <= seq <= last_seq
-- (tombstones and purged seqs are absent from it). A Hoomi's segments never overlap.
-- erase_pending: a message in it was deleted for everyone or purged since it was
-- written; the archiver rewrites the segment without it (docs/storage.md).
CREATE TABLE message_segments (
    hoomi_id      UUID NOT NULL REFERENCES hoomis(id) ON DELETE CASCADE,
    first_seq     BIGINT NOT NULL CHECK (first_seq > 0),
    last_seq      BIGINT NOT NULL,
    object_key    TEXT NOT NULL,
    checksum      TEXT NOT NULL,            -- sha256 of the whole object, hex
    size          BIGINT NOT NULL CHECK (size > 0),
    messages      INTEGER NOT NULL CHECK (messages > 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    erase_pending BOOLEAN NOT NULL DEFAULT false,
    CONSTRAINT message_segments_pkey PRIMARY KEY (hoomi_id, first_seq),
    CONSTRAINT message_segments_range CHECK (last_seq >= first_seq),
    CONSTRAINT message_segments_key UNIQUE (hoomi_id, object_key)
);

CREATE INDEX message_segments_erase ON message_segments (hoomi_id) WHERE erase_pending;

-- Object keys that may exist in the store without a segment row pointing at them: a
-- segment about to be written (recorded before the write, so a crash leaves no
-- unknown object), or one replaced or dropped (by a rewrite, or its Hoomi's deletion).
-- Each archive pass deletes those objects, then these rows.
CREATE TABLE archive_orphans (
    hoomi_id    UUID NOT NULL,              -- no foreign key: outlives a deleted Hoomi
    object_key  TEXT NOT NULL,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT archive_orphans_pkey PRIMARY KEY (hoomi_id, object_key)
);

-- A segment row that goes away (or changes object) leaves its object to be deleted,
-- whatever removed it: a rewrite, or ON DELETE CASCADE from its Hoomi.
CREATE FUNCTION hoomi_segment_orphaned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.object_key IS DISTINCT FROM NEW.object_key THEN
        INSERT INTO archive_orphans (hoomi_id, object_key)
        VALUES (OLD.hoomi_id, OLD.object_key) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER message_segments_orphaned
    AFTER DELETE OR UPDATE OF object_key ON message_segments
    FOR EACH ROW EXECUTE FUNCTION hoomi_segment_orphaned();
