-- campaignd schema, version 12: a recipient remembers that a send of it may have been delivered.

-- A send cut off after its request left (a timeout, a connection lost mid-request, a gateway's
-- 502, a crash) may have reached the provider. A sender that resends in doubt (an idempotency
-- key) kept that only in error_code, which the next attempt overwrites: a retry that met a
-- 503, or a claim given back unsent at a stop, left a row that looked never sent, and a cancel
-- (or a failed campaign's sweep) then ended it `skipped`, "not sent", for a message the
-- provider may have delivered. Set once any attempt may have been delivered, never cleared.
-- A constant default: adding it rewrites no row (PostgreSQL 11 and later). Rows pending before
-- it keep their error_code 'in_doubt', which the statements still read as well.
ALTER TABLE campaignd.recipients
    ADD COLUMN maybe_delivered boolean NOT NULL DEFAULT false;
