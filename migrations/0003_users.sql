-- Users of the admin site, their login sessions, and what the site's lists search on.

CREATE TABLE app_user (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Kept as typed; unique whatever the case (a login matches on lower(email)).
    email         text        NOT NULL CHECK (email <> ''),
    -- Argon2id, as a PHC string ($argon2id$v=19$...).
    password_hash text        NOT NULL,
    -- Symfony-style role names; ROLE_ADMIN reaches the admin site.
    roles         text[]      NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX app_user_email_key ON app_user (lower(email));

-- Login sessions (tower-sessions records): an opaque random id, its data, its expiry.
CREATE TABLE app_session (
    id         text        PRIMARY KEY,
    data       jsonb       NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX app_session_expires_at_idx ON app_session (expires_at);

-- The device lists search by code prefix (case-insensitive) across all gateways.
CREATE INDEX device_lower_code_idx ON device (lower(code) text_pattern_ops);
