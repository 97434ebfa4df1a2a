-- campaignd schema, version 4: a big campaign starts sending before all of it is prepared.

-- While prepared_at is NULL, the fresh recipients with ids below this one are prepared (their
-- skips decided, the pre-flight passed) and may be claimed; the rest are prepared while those
-- are sent. NULL before any preparation. Only the lane that prepares a campaign writes it.
ALTER TABLE campaignd.campaigns
    ADD COLUMN prepared_below bigint;
