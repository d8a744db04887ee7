-- Readings, on plain PostgreSQL (no TimescaleDB): one indexed table.
-- Time-bucketed queries use date_bin() where TimescaleDB would use time_bucket().

CREATE TABLE tag_reading (
    time       timestamptz      NOT NULL,
    device_id  bigint           NOT NULL,
    tag_id     bigint           NOT NULL,
    gateway_id integer,
    value_num  double precision,
    value_bool boolean,
    value_text text,
    value_json jsonb,
    value_type text             NOT NULL
);

CREATE INDEX tag_reading_tag_id_time_idx ON tag_reading (tag_id, time DESC);
CREATE INDEX tag_reading_time_brin ON tag_reading USING brin (time);

-- Each raw message's readings are stored once: the writer records the message id in the same
-- transaction as its rows, and skips ids already there (redelivery, replay).
CREATE TABLE ingested_message (
    id          uuid        PRIMARY KEY,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
