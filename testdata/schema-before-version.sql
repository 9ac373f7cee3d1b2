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

-- The service stores addresses in lower case; the database holds it to that,
-- as it holds them to uniqueness. Added apart from CREATE TABLE, so that a
-- table made before it gets it too.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint
                   WHERE conrelid = 'users'::regclass AND conname = 'users_email_lower') THEN
        ALTER TABLE users ADD CONSTRAINT users_email_lower CHECK (email = lower(email));
    END IF;
END $$;

-- Consecutive failed checks of POST /users/authenticate, per normalized email
-- address, whether or not a user has it. Every replica reads and counts the
-- same rows. A success deletes its row; a row whose last failure is 24 hours
-- old is forgotten, and deleted by a later failure (up to ten old rows each,
-- oldest first through this index), so a flood of random addresses cannot
-- grow the table beyond the last day's failures.
CREATE TABLE IF NOT EXISTS auth_failures (
    email     text        PRIMARY KEY,
    failures  integer     NOT NULL,
    failed_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_failures_failed_at ON auth_failures (failed_at);
