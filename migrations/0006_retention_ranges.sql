-- The page ranges of tag_reading's BRIN index on time that a retention pass deleted readings
-- from (their first pages), for the next pass to summarize again (core/src/retention.rs): kept
-- here so that a writer restarted in between, or another writer taking the next pass, still
-- does. Empty on TimescaleDB, which drops whole chunks instead.
CREATE TABLE retention_range (
    first_page bigint PRIMARY KEY
);
