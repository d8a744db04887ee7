-- Readings, on TimescaleDB: a hypertable partitioned by time, compressed and expired by policy.

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

SELECT create_hypertable('tag_reading', 'time', chunk_time_interval => INTERVAL '1 day');

CREATE INDEX tag_reading_tag_id_time_idx ON tag_reading (tag_id, time DESC);

ALTER TABLE tag_reading SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'tag_id',
    timescaledb.compress_orderby = 'time DESC'
);
-- Chunks older than a week are compressed; late data should stay younger than that.
SELECT add_compression_policy('tag_reading', INTERVAL '7 days');
SELECT add_retention_policy('tag_reading', INTERVAL '365 days');

-- Each raw message's readings are stored once: the writer records the message id in the same
-- transaction as its rows, and skips ids already there (redelivery, replay).
CREATE TABLE ingested_message (
    id          uuid        PRIMARY KEY,
    ingested_at timestamptz NOT NULL DEFAULT now()
);
