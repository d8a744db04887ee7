-- The writer forgets the ids of messages ingested longer ago than any copy of them can come
-- back (core/src/retention.rs): this index finds them without reading the whole table. Rows
-- arrive in ingested_at order, so its inserts go to the right edge, like the primary key's.
CREATE INDEX ingested_message_ingested_at_idx ON ingested_message (ingested_at);
