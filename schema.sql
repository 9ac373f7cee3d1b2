-- The users table. This file is embedded in the binary and applied on every
-- boot, inside a transaction that holds an advisory lock, so it must stay
-- idempotent: every statement is "if not exists".
CREATE TABLE IF NOT EXISTS users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_name text        NOT NULL,
    last_name  text        NOT NULL,
    -- Stored trimmed and lower-cased by the service, so this constraint makes
    -- addresses unique case-insensitively.
    email      text        NOT NULL CONSTRAINT users_email_key UNIQUE,
    -- The bcrypt hash, and the salt bcrypt generated for it (the hash's
    -- 29-character "$2a$cc$" prefix).
    password   text        NOT NULL,
    salt       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Added apart from CREATE TABLE, so that a table made before them gets them
-- too, and only then, so that a boot takes no lock on the table otherwise:
-- the service stores addresses in lower case, and the database holds it to
-- that, as it holds them to uniqueness; version goes up with every change
-- of a user, and is its ETag.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                   WHERE conrelid = 'users'::regclass AND conname = 'users_email_lower') THEN
        ALTER TABLE users ADD CONSTRAINT users_email_lower CHECK (email = lower(email));
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = 'users'::regclass AND attname = 'version' AND NOT attisdropped) THEN
        ALTER TABLE users ADD COLUMN version bigint NOT NULL DEFAULT 1;
    END IF;
END $$;

-- The service stores addresses in Unicode NFC. A row stored before in another
-- form is brought to NFC, unless another account already has that spelling:
-- then both stay as they are.
UPDATE users u SET email = n.email
FROM (SELECT min(id) AS id, normalize(email, NFC) AS email
      FROM users WHERE email IS NOT NFC NORMALIZED GROUP BY 2) n
WHERE u.id = n.id AND NOT EXISTS (SELECT FROM users o WHERE o.email = n.email);

-- Failed sign-ins, one row per failure, per normalized email address (with
-- or without a user) and client (see auth.go). A success deletes that
-- client's rows for the address; rows older than a day are deleted by later
-- failures. auth_failures, keyed by address alone, is replaced.
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

-- The clients each user signed in from, with the last success: familiar for
-- 30 days, then deleted by later successes.
CREATE TABLE IF NOT EXISTS sign_in_clients (
    user_id      bigint      NOT NULL REFERENCES users ON DELETE CASCADE,
    client       text        NOT NULL,
    signed_in_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, client)
);
CREATE INDEX IF NOT EXISTS sign_in_clients_signed_in_at ON sign_in_clients (signed_in_at);
