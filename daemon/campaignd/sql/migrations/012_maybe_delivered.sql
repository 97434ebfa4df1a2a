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

-- Whether a pending recipient waits for a resend of a send that may have been delivered: a
-- cancel, or the sweep of a cancelled or failed campaign, ends it failed 'in_doubt', as it would
-- have without a resend, not skipped. error_code 'in_doubt' says so on rows from before this
-- version. Inlined by the planner (one expression over the row).
CREATE FUNCTION campaignd.sent_in_doubt(recipient campaignd.recipients) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT recipient.maybe_delivered OR recipient.error_code IS NOT DISTINCT FROM 'in_doubt' $$;

-- The error_message of such a recipient ended failed 'in_doubt' when its campaign ended ($2:
-- how, "the campaign was cancelled"): the recovery's own reason when it has one, else that
-- an earlier attempt may have been delivered, and the last error.
CREATE FUNCTION campaignd.in_doubt_reason(recipient campaignd.recipients, ended text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN recipient.error_code = 'in_doubt'
            THEN coalesce(recipient.error_message, ended || ' while this send was in doubt')
        ELSE ended || ' while this send was in doubt: an earlier attempt may have been delivered'
             || coalesce(' (last error: ' || recipient.error_code || ')', '')
    END
$$;
