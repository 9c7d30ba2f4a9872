-- Hoomi hub schema, version 8: read receipts (issue 13; SPEC §7.2 `read`).
--
-- `read_seq`: how far the member has read the Hoomi. A `read` only ever raises it
-- (GREATEST, and never past the Hoomi's last_seq), so it never moves back, whatever the
-- order in which a user's devices report. It lives on the membership row: it goes with
-- the membership (a member removed and added again starts at 0) and is distributed with
-- hoomi_members by hoomi_id on Citus. A constant default adds the column without
-- rewriting the table.

ALTER TABLE hoomi_members ADD COLUMN read_seq BIGINT NOT NULL DEFAULT 0
    CONSTRAINT hoomi_members_read_seq_nonnegative CHECK (read_seq >= 0);
