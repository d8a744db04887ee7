-- From this version the writer stores each message id under a key that leads with the time of
-- the message's readings (dataviz_model::identity::stored_key), so that its inserts go to the
-- primary key's right edge. Ids stored before, as they were, are still found by the id itself
-- (core/src/ingested.rs) until the writer's retention has forgotten them: this row says since
-- when keys are stored. None when there was no id to find.
CREATE TABLE ingested_message_keyed (
    since timestamptz NOT NULL
);
INSERT INTO ingested_message_keyed (since)
SELECT now() WHERE EXISTS (SELECT 1 FROM ingested_message);
