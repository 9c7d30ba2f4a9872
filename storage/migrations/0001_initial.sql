-- Hoomi hub schema, version 1.
-- Deviations from the original design (seed) are listed in docs/storage.md with their reasons.

CREATE TABLE users (
    id          UUID PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE hoomis (
    id                 UUID PRIMARY KEY,
    -- Per-Hoomi counter: the last seq handed out. Only the batched writer moves it,
    -- under this row's lock, so seqs are dense and in commit order.
    last_seq           BIGINT NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    -- NULL keeps messages forever; otherwise the purge job erases older ones.
    retention_seconds  BIGINT CHECK (retention_seconds IS NULL OR retention_seconds > 0),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE hoomi_members (
    hoomi_id   UUID NOT NULL REFERENCES hoomis(id) ON DELETE CASCADE,
    user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'member')),
    joined_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (hoomi_id, user_id)
);
-- "Which Hoomis is this user in?" runs at every hello.
CREATE INDEX idx_hoomi_members_user ON hoomi_members(user_id);

CREATE TABLE messages (
    id             UUID PRIMARY KEY,             -- UUIDv7, made by the hub: time-ordered
    hoomi_id       UUID NOT NULL REFERENCES hoomis(id) ON DELETE CASCADE,
    seq            BIGINT NOT NULL CHECK (seq > 0),
    -- Nullable, unlike the seed: ON DELETE SET NULL needs it to keep the message.
    sender_id      UUID REFERENCES users(id) ON DELETE SET NULL,
    client_msg_id  UUID NOT NULL,
    -- Ciphertext as bytea (the seed said base64 TEXT): a third smaller, no decoding.
    -- NULL only on a tombstone (deleted for everyone).
    content        BYTEA,
    nonce          BYTEA,
    session_id     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at     TIMESTAMPTZ,
    CONSTRAINT messages_hoomi_seq_key UNIQUE (hoomi_id, seq),
    CONSTRAINT messages_tombstone_erased CHECK (
        (deleted_at IS NULL AND content IS NOT NULL AND nonce IS NOT NULL)
        OR (deleted_at IS NOT NULL AND content IS NULL AND nonce IS NULL AND session_id IS NULL)
    ),
    CONSTRAINT messages_nonce_len CHECK (nonce IS NULL OR octet_length(nonce) = 12)
);

-- The seed's three indexes, by name.
CREATE INDEX idx_messages_hoomi_created ON messages(hoomi_id, created_at);
-- Widened to (sender_id, client_msg_id) and made UNIQUE: it still serves "a user's
-- messages" (sender_id leads) and also enforces idempotent retries without a 4th index.
CREATE UNIQUE INDEX idx_messages_sender ON messages(sender_id, client_msg_id);
CREATE INDEX idx_messages_created ON messages(created_at);

CREATE TABLE audit_log (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor_kind  TEXT NOT NULL CHECK (actor_kind IN ('user', 'operator', 'system')),
    actor_id    UUID,
    action      TEXT NOT NULL,
    -- No foreign keys: the audit trail must outlive what it describes.
    hoomi_id    UUID,
    target_id   UUID,
    details     JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX idx_audit_log_at ON audit_log(at);
CREATE INDEX idx_audit_log_hoomi ON audit_log(hoomi_id, at);
