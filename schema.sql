-- Applied on every boot in one transaction, under an advisory lock so that
-- replicas booting together apply it in turn: it must stay idempotent.
SELECT pg_advisory_xact_lock(7216449301);
CREATE TABLE IF NOT EXISTS users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_name text        NOT NULL,
    last_name  text        NOT NULL,
    email      text        NOT NULL CONSTRAINT users_email_key UNIQUE, -- lower case, NFC
    password   text        NOT NULL, -- bcrypt hash
    salt       text        NOT NULL, -- the hash's "$2a$cc$" + salt prefix
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Added apart, so that an older table gets them too, and only then, so that
-- a boot takes no lock on the table otherwise.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                   WHERE conrelid = 'users'::regclass AND conname = 'users_email_lower') THEN
        ALTER TABLE users ADD CONSTRAINT users_email_lower CHECK (email = lower(email));
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = 'users'::regclass AND attname = 'version' AND NOT attisdropped) THEN
        ALTER TABLE users ADD COLUMN version bigint NOT NULL DEFAULT 1; -- the ETag
    END IF;
END $$;

-- Older rows are brought to NFC, unless another account has that spelling.
UPDATE users u SET email = n.email
FROM (SELECT min(id) AS id, normalize(email, NFC) AS email
      FROM users WHERE email IS NOT NFC NORMALIZED GROUP BY 2) n
WHERE u.id = n.id AND NOT EXISTS (SELECT FROM users o WHERE o.email = n.email);

-- Failed sign-ins by address (with or without a user) and client; rows a
-- day old are deleted by later failures. auth_failures was the old table.
DROP TABLE IF EXISTS auth_failures;
CREATE TABLE IF NOT EXISTS sign_in_failures (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email     text        NOT NULL,
    client    text        NOT NULL,
    failed_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sign_in_failures_email ON sign_in_failures (email, failed_at);
CREATE INDEX IF NOT EXISTS sign_in_failures_client ON sign_in_failures (client, failed_at);
CREATE INDEX IF NOT EXISTS sign_in_failures_failed_at ON sign_in_failures (failed_at);

-- Each user's clients and last success: familiar for 30 days.
CREATE TABLE IF NOT EXISTS sign_in_clients (
    user_id      bigint      NOT NULL REFERENCES users ON DELETE CASCADE,
    client       text        NOT NULL,
    signed_in_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, client)
);
CREATE INDEX IF NOT EXISTS sign_in_clients_signed_in_at ON sign_in_clients (signed_in_at);
