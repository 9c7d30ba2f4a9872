-- Hoomi hub schema, version 4: `messages` hash-partitioned by hoomi_id, ready for Citus.
--
-- Every primary key and unique constraint now includes hoomi_id (Citus' rule for a table
-- distributed by hoomi_id; see docs/scaling.md), and the idempotency key becomes
-- (hoomi_id, sender_id, client_msg_id): a retry names the same Hoomi.
--
-- The partition count comes from HOOMI_MESSAGE_PARTITIONS: storage/migrate.py sets it as
-- `hoomi.message_partitions` for this transaction, and it is recorded in
-- `hub_settings` (a later start with another value is refused).
--
-- An existing install's messages are moved by a resumable copy (storage/migrate.py,
-- `hoomi migrate`): this migration only creates `messages_partitioned` next to the old
-- table, a trigger that mirrors every later insert, update and delete of the old table
-- into it (so replicas of the previous release keep serving during the copy), and the
-- two functions the copy calls: `hoomi_copy_messages(n)` copies the next n rows in id
-- order, `hoomi_finish_messages_copy()` swaps the tables under a brief exclusive lock.
-- On a fresh install (no message yet) the swap happens here, in this transaction.

CREATE TABLE hub_settings (
    -- Choices fixed at install time, recorded so a later start can check them.
    name    TEXT PRIMARY KEY,
    value   TEXT NOT NULL,
    set_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO hub_settings (name, value)
VALUES ('message_partitions', current_setting('hoomi.message_partitions'));

-- Same columns, in the same order, as 0001's messages. Index and key names carry a
-- `_new` suffix while the old table still holds the final names; the swap renames them.
CREATE TABLE messages_partitioned (
    id             UUID NOT NULL,
    hoomi_id       UUID NOT NULL REFERENCES hoomis(id) ON DELETE CASCADE,
    seq            BIGINT NOT NULL CHECK (seq > 0),
    sender_id      UUID REFERENCES users(id) ON DELETE SET NULL,
    client_msg_id  UUID NOT NULL,
    content        BYTEA,
    nonce          BYTEA,
    session_id     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at     TIMESTAMPTZ,
    -- id leads: UUIDv7 ids keep inserts on the right edge of each partition's index.
    CONSTRAINT messages_new_pkey PRIMARY KEY (id, hoomi_id),
    CONSTRAINT messages_new_hoomi_seq_key UNIQUE (hoomi_id, seq),
    CONSTRAINT messages_tombstone_erased CHECK (
        (deleted_at IS NULL AND content IS NOT NULL AND nonce IS NOT NULL)
        OR (deleted_at IS NOT NULL AND content IS NULL AND nonce IS NULL AND session_id IS NULL)
    ),
    CONSTRAINT messages_nonce_len CHECK (nonce IS NULL OR octet_length(nonce) = 12)
) PARTITION BY HASH (hoomi_id);

-- The partitions, messages_p00 .. messages_pNN, each with 0003's autovacuum settings
-- (a partitioned table holds no rows and takes no storage parameters itself).
DO $$
DECLARE
    n integer := current_setting('hoomi.message_partitions')::integer;
BEGIN
    IF n < 1 OR n > 1024 THEN
        RAISE EXCEPTION 'HOOMI_MESSAGE_PARTITIONS must be between 1 and 1024, got %', n;
    END IF;
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF messages_partitioned '
            'FOR VALUES WITH (MODULUS %s, REMAINDER %s) WITH ('
            'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 200, '
            'toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 200)',
            'messages_p' || lpad(i::text, greatest(2, length((n - 1)::text)), '0'), n, i);
    END LOOP;
END $$;

-- The seed's three indexes (final names after the swap). idx_messages_sender holds the
-- idempotency key; sender_id leads so it still serves "a sender's messages" and the
-- ON DELETE SET NULL of a deleted user.
CREATE INDEX idx_messages_hoomi_created_new ON messages_partitioned(hoomi_id, created_at);
CREATE UNIQUE INDEX idx_messages_sender_new
    ON messages_partitioned(sender_id, client_msg_id, hoomi_id);
CREATE INDEX idx_messages_created_new ON messages_partitioned(created_at);

-- Progress of the copy: one row. `cursor` is the last id copied (ids are copied in
-- order); `total` the old table's row count estimate when the copy began.
CREATE TABLE messages_copy (
    only_one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_one),
    cursor       UUID,
    copied       BIGINT NOT NULL DEFAULT 0,
    total        BIGINT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ
);
INSERT INTO messages_copy (total)
SELECT CASE WHEN reltuples < 0 THEN (SELECT count(*) FROM messages) ELSE reltuples::bigint END
FROM pg_class WHERE oid = 'messages'::regclass;

-- While the copy runs, every change to the old table is applied to the new one too.
CREATE FUNCTION hoomi_mirror_messages() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM messages_partitioned WHERE id = OLD.id AND hoomi_id = OLD.hoomi_id;
        RETURN OLD;
    END IF;
    INSERT INTO messages_partitioned
    VALUES (NEW.id, NEW.hoomi_id, NEW.seq, NEW.sender_id, NEW.client_msg_id, NEW.content,
            NEW.nonce, NEW.session_id, NEW.created_at, NEW.updated_at, NEW.deleted_at)
    ON CONFLICT (id, hoomi_id) DO UPDATE SET
        seq = EXCLUDED.seq, sender_id = EXCLUDED.sender_id,
        client_msg_id = EXCLUDED.client_msg_id, content = EXCLUDED.content,
        nonce = EXCLUDED.nonce, session_id = EXCLUDED.session_id,
        created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
        deleted_at = EXCLUDED.deleted_at;
    RETURN NEW;
END $$;

CREATE TRIGGER messages_mirror AFTER INSERT OR UPDATE OR DELETE ON messages
FOR EACH ROW EXECUTE FUNCTION hoomi_mirror_messages();

-- The next `batch` rows after the cursor, in id order; returns how many (0: done, or
-- the swap already happened). FOR KEY SHARE holds off a concurrent delete of a row
-- being copied until this batch commits (the trigger then deletes the copy); a
-- concurrent tombstone or update either committed first (ON CONFLICT keeps the
-- trigger's newer version) or waits for this batch and then overwrites it.
CREATE FUNCTION hoomi_copy_messages(batch integer) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    job  messages_copy%ROWTYPE;
    n    integer;
    last uuid;
BEGIN
    SELECT * INTO job FROM messages_copy FOR UPDATE;  -- one copier at a time
    IF job.finished_at IS NOT NULL THEN
        RETURN 0;
    END IF;
    WITH b AS (
        SELECT id, hoomi_id, seq, sender_id, client_msg_id, content, nonce, session_id,
               created_at, updated_at, deleted_at
        FROM messages
        WHERE id > coalesce(job.cursor, '00000000-0000-0000-0000-000000000000')
        ORDER BY id
        LIMIT batch
        FOR KEY SHARE
    ), ins AS (
        INSERT INTO messages_partitioned SELECT * FROM b ON CONFLICT DO NOTHING
    )
    SELECT count(*), (array_agg(id ORDER BY id DESC))[1] INTO n, last FROM b;
    IF n > 0 THEN
        UPDATE messages_copy SET cursor = last, copied = copied + n;
    END IF;
    RETURN n;
END $$;

-- The swap: copies what is left, then the partitioned table takes the name `messages`
-- and the final index names; the old table and the trigger go. Under an ACCESS
-- EXCLUSIVE lock on the old table (writers wait for it, for as long as the last batch).
CREATE FUNCTION hoomi_finish_messages_copy() RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    job messages_copy%ROWTYPE;
BEGIN
    SELECT * INTO job FROM messages_copy FOR UPDATE;
    IF job.finished_at IS NOT NULL THEN
        RETURN false;
    END IF;
    LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;
    WHILE hoomi_copy_messages(10000) > 0 LOOP
    END LOOP;
    DROP TABLE messages;
    DROP FUNCTION hoomi_mirror_messages();
    ALTER TABLE messages_partitioned RENAME TO messages;
    ALTER TABLE messages RENAME CONSTRAINT messages_new_pkey TO messages_pkey;
    ALTER TABLE messages RENAME CONSTRAINT messages_new_hoomi_seq_key TO messages_hoomi_seq_key;
    ALTER TABLE messages RENAME CONSTRAINT messages_partitioned_hoomi_id_fkey
        TO messages_hoomi_id_fkey;
    ALTER TABLE messages RENAME CONSTRAINT messages_partitioned_sender_id_fkey
        TO messages_sender_id_fkey;
    ALTER TABLE messages RENAME CONSTRAINT messages_partitioned_seq_check TO messages_seq_check;
    ALTER INDEX idx_messages_hoomi_created_new RENAME TO idx_messages_hoomi_created;
    ALTER INDEX idx_messages_sender_new RENAME TO idx_messages_sender;
    ALTER INDEX idx_messages_created_new RENAME TO idx_messages_created;
    UPDATE messages_copy SET finished_at = now();
    RETURN true;
END $$;

-- A fresh install, or one without messages: nothing to copy, swap now.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM messages) THEN
        PERFORM hoomi_finish_messages_copy();
    END IF;
END $$;
