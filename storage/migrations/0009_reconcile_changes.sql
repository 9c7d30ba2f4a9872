-- Hoomi hub schema, version 9: a reconcile that reads only what changed (issue 11).
--
-- Every replica reconciles every HOOMI_RECONCILE_INTERVAL_S (server/hub.py). It used to
-- re-read the last_seq of every Hoomi it follows and the memberships of every connected
-- user, so the idle load grew with replicas x Hoomis. Now each replica keeps a watermark,
-- the xmin of the snapshot of its previous look (pg_snapshot_xmin: every transaction
-- below it had ended), and reads the changes of transactions at or above it:
--
-- * `hoomis.changed_xid`: the transaction that last moved `last_seq` (set by a trigger,
--   so the writer's UPDATE is unchanged); read with an index on it.
-- * `member_changes`: one row per user per statement that changed their memberships
--   (hoomi_members inserted, deleted, cascades included, or a role changed) or deleted the user,
--   written by statement triggers in the same transaction. Rows older than an hour are
--   deleted by the reconcile; a replica that has not reconciled for half an hour does a
--   full round instead of trusting its watermark.
--
-- A row written by a transaction still running when a replica looks has an xid at or
-- above that look's xmin, so the next look reads it: nothing is skipped, whatever the
-- commit order. A long transaction holds the xmin back: each look then re-reads the
-- changes since it began (bounded by the write rate, not by the number of Hoomis).
-- Single-node PostgreSQL: on Citus, xids are per node (docs/scaling.md).

ALTER TABLE hoomis ADD COLUMN changed_xid xid8;
CREATE INDEX idx_hoomis_changed_xid ON hoomis (changed_xid) WHERE changed_xid IS NOT NULL;

CREATE FUNCTION hoomis_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    RETURN NEW;
END $$;

CREATE TRIGGER hoomis_changed BEFORE UPDATE OF last_seq ON hoomis
    FOR EACH ROW WHEN (OLD.last_seq IS DISTINCT FROM NEW.last_seq)
    EXECUTE FUNCTION hoomis_changed();

CREATE TABLE member_changes (
    changed_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    user_id      UUID NOT NULL,
    at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_member_changes_xid ON member_changes (changed_xid);

CREATE FUNCTION member_changes_new() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_changes (user_id) SELECT DISTINCT user_id FROM changed_rows;
    RETURN NULL;
END $$;

CREATE TRIGGER hoomi_members_inserted AFTER INSERT ON hoomi_members
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION member_changes_new();

-- A role change only (not read_seq, which every `read` moves): row by row, rare.
CREATE FUNCTION member_changes_role() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_changes (user_id) VALUES (NEW.user_id);
    RETURN NULL;
END $$;

CREATE TRIGGER hoomi_members_role AFTER UPDATE OF role ON hoomi_members
    FOR EACH ROW WHEN (OLD.role IS DISTINCT FROM NEW.role)
    EXECUTE FUNCTION member_changes_role();
CREATE TRIGGER hoomi_members_deleted AFTER DELETE ON hoomi_members
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION member_changes_new();

CREATE FUNCTION member_changes_user_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_changes (user_id) SELECT id FROM changed_rows;
    RETURN NULL;
END $$;

CREATE TRIGGER users_deleted AFTER DELETE ON users
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION member_changes_user_gone();
