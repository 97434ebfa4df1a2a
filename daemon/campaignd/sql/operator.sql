-- Operator commands (campaignd pause | resume | cancel | senders | resume-sender | doctor).
-- None of these writes on behalf of a sender lane, so none is fenced by a lane epoch: they
-- change what a lane is asked to do (a campaign's status, a sender's paused_reason), and
-- the lanes react through their own status checks (claim_recipients requires 'sending').
-- Counters still change in the same statement as the recipient states they count.

-- name: op_campaign
-- What a transition is decided on. $1 campaign id
SELECT c.id, c.name, c.sender_id, c.status, c.status_reason, s.paused_reason AS sender_paused_reason
FROM campaignd.campaigns c
JOIN campaignd.senders s ON s.id = c.sender_id
WHERE c.id = $1;

-- name: op_pause_campaign
-- A campaign paused with its sender ($3: the reason it was paused with, which is the
-- sender's) is taken over too: resume-sender resumes exactly those, and the operator's
-- pause must outlast it. $1 campaign id, $2 reason, $3 the sender's pause reason it holds
UPDATE campaignd.campaigns
SET status = 'paused', status_reason = $2, updated_at = now()
WHERE id = $1 AND (status = 'sending' OR (status = 'paused' AND status_reason = $3))
RETURNING id;

-- name: op_resume_campaign
-- The status change fires campaigns_notify_work, which wakes the daemons. $1 campaign id
UPDATE campaignd.campaigns
SET status = 'sending', status_reason = NULL, updated_at = now()
WHERE id = $1 AND status = 'paused'
RETURNING id;

-- name: op_cancel_campaign
-- The campaign ends cancelled (from draft, sending or paused); its pending recipients are
-- ended by op_cancel_pending, a chunk a statement: one statement over every pending recipient
-- of a campaign of millions outlasted statement_timeout, and the cancel could not be made.
-- No claim starts once this has committed (claim_recipients requires 'sending'); claims given
-- back after it land as pending and are ended by the next chunk, or by the watchdog's sweep.
-- A campaign that was never prepared has no total_count yet; it gets one here.
-- The row is locked FOR UPDATE first, which a preparation's KEY SHARE holds off: a cancel that
-- cannot wait that long (lock_timeout) changes nothing, rather than cancel a campaign whose
-- recipients the preparation is still skipping.
-- No row if the campaign could not be cancelled. $1 campaign id, $2 reason
WITH cancellable AS (
    SELECT id FROM campaignd.campaigns
    WHERE id = $1 AND status IN ('draft', 'sending', 'paused')
    FOR UPDATE
)
UPDATE campaignd.campaigns c
SET status = 'cancelled',
    status_reason = $2,
    completed_at = now(),
    lease_owner = NULL,
    lease_expires_at = NULL,
    total_count = CASE
        WHEN c.prepared_at IS NULL THEN (SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1)
        ELSE c.total_count END,
    updated_at = now()
WHERE c.id = (SELECT id FROM cancellable)
RETURNING c.status;

-- name: op_cancel_pending
-- Up to $3 pending recipients of a cancelled campaign end skipped, with skipped_count raised
-- by exactly the rows changed; but one waiting for a resend of a send that may have been
-- delivered (resend_in_doubt = true; campaignd.sent_in_doubt, migration 012) ends failed
-- 'in_doubt', as it would have without a resend, counted in failed_count. The caller calls
-- again until a call ends none. The campaign row is locked first, the order a lane's writes
-- take: outcomes lock it before their recipients, and a preparation holds it (FOR KEY SHARE)
-- while it skips recipients, so a cancel waits for the one and the other instead of
-- deadlocking with them on the recipients both would change. Rows the preparation skipped
-- meanwhile are not pending any more, so they are not counted twice. Rows a claim holds are
-- waited for, and left out if the claim took them: in-flight recipients are recorded by the
-- lane holding them (op_campaign_in_flight counts them, once the cancel has committed).
-- No row if the campaign is not cancelled.
-- $1 campaign id, $2 error message, $3 how many recipients at most
WITH cancelled AS (
    SELECT id FROM campaignd.campaigns WHERE id = $1 AND status = 'cancelled' FOR UPDATE
), ended AS (
    UPDATE campaignd.recipients r
    SET state = CASE WHEN campaignd.sent_in_doubt(r) THEN 'failed' ELSE 'skipped' END,
        error_code = CASE WHEN campaignd.sent_in_doubt(r) THEN 'in_doubt' ELSE 'cancelled' END,
        error_message = CASE WHEN campaignd.sent_in_doubt(r)
            THEN campaignd.in_doubt_reason(r, 'the campaign was cancelled') ELSE $2 END,
        next_attempt_at = NULL, updated_at = now()
    -- Found by id (see wd_sweep_ended for why not a join).
    WHERE r.id = ANY (ARRAY(
            SELECT p.id FROM campaignd.recipients p
            WHERE p.campaign_id = (SELECT id FROM cancelled) AND p.state = 'pending'
            LIMIT $3
            FOR UPDATE))
      AND r.state = 'pending'
    RETURNING r.state
), counted AS (
    SELECT count(*) FILTER (WHERE state = 'skipped')::integer AS skipped,
           count(*) FILTER (WHERE state = 'failed')::integer AS failed
    FROM ended
)
UPDATE campaignd.campaigns c
SET skipped_count = c.skipped_count + counted.skipped,
    failed_count = c.failed_count + counted.failed,
    updated_at = now()
FROM counted
WHERE c.id = (SELECT id FROM cancelled)
RETURNING counted.skipped AS cancelled, counted.failed AS in_doubt;

-- name: op_campaign_in_flight
-- Run after the cancel has committed, in a statement (and snapshot) of its own: a claim the
-- cancel waited for committed after the cancel's snapshot was taken, so the cancel itself
-- cannot see those rows in flight. No claim starts after the cancel commits
-- (claim_recipients requires status 'sending'). $1 campaign id
SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight';

-- name: op_senders
SELECT s.id, s.provider, s.rate_per_second, s.burst, s.resend_in_doubt,
       s.lease_owner, s.lease_epoch, s.lease_expires_at,
       (s.lease_owner IS NOT NULL AND coalesce(s.lease_expires_at > now(), false)) AS lease_live,
       s.paused_reason,
       (SELECT count(*) FROM campaignd.campaigns c
        WHERE c.sender_id = s.id AND c.status = 'sending') AS sending_campaigns
FROM campaignd.senders s
ORDER BY s.id;

-- name: op_daemons
-- Every daemon that announced itself, live first; lanes counted from the live leases.
SELECT d.owner, d.senders, d.started_at, d.seen_at, d.expires_at,
       d.expires_at > now() AS live,
       (SELECT count(*) FROM campaignd.senders s
        WHERE s.lease_owner = d.owner AND s.lease_expires_at > now()) AS lanes
FROM campaignd.daemons d
ORDER BY d.expires_at > now() DESC, d.owner;

-- name: op_lock_sender
-- First statement of resume-sender's transaction: waits for a pause_sender in progress to
-- commit, so the next statements see every campaign it paused. $1 sender id
SELECT id, paused_reason FROM campaignd.senders WHERE id = $1 FOR UPDATE;

-- name: op_resume_sender_campaigns
-- Only the campaigns the daemon paused because of the sender: pause_sender sets their
-- status_reason to the sender's paused_reason. An operator's or host's pause stays.
-- $1 sender id, $2 the sender's paused_reason
UPDATE campaignd.campaigns
SET status = 'sending', status_reason = NULL, updated_at = now()
WHERE sender_id = $1 AND status = 'paused' AND status_reason = $2
RETURNING id;

-- name: op_clear_sender_pause
-- Fires senders_notify_work, which wakes the daemons. $1 sender id
UPDATE campaignd.senders
SET paused_reason = NULL, updated_at = now()
WHERE id = $1 AND paused_reason IS NOT NULL;

-- name: op_doctor_campaign
-- Everything about one campaign that fits in one row: the campaign, its sender's lane, and
-- its recipients aggregated in one pass. now() is returned so that the diagnosis compares
-- times against the database's clock, not the operator's. $1 campaign id
SELECT c.id, c.name, c.sender_id, c.status, c.status_reason,
       c.total_count, c.sent_count, c.failed_count, c.skipped_count,
       c.prepared_at IS NOT NULL AS prepared, c.stuck_since, c.stuck_reason, now() AS now,
       s.paused_reason AS sender_paused_reason, s.lease_owner AS sender_lease_owner,
       s.lease_epoch AS sender_lease_epoch, s.lease_expires_at AS sender_lease_expires_at,
       (s.lease_owner IS NOT NULL AND coalesce(s.lease_expires_at > now(), false)) AS sender_lease_live,
       r.pending, r.in_flight, r.sent, r.failed, r.skipped, r.no_address,
       r.pending_due, r.pending_waiting, r.next_retry_at, r.last_retry_at
FROM campaignd.campaigns c
JOIN campaignd.senders s ON s.id = c.sender_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE state = 'sent') AS sent,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'skipped') AS skipped,
           count(*) FILTER (WHERE address IS NULL OR btrim(address) = '') AS no_address,
           count(*) FILTER (WHERE state = 'pending'
                            AND (next_attempt_at IS NULL OR next_attempt_at <= now())) AS pending_due,
           count(*) FILTER (WHERE state = 'pending' AND next_attempt_at > now()) AS pending_waiting,
           min(next_attempt_at) FILTER (WHERE state = 'pending' AND next_attempt_at > now()) AS next_retry_at,
           max(next_attempt_at) FILTER (WHERE state = 'pending' AND next_attempt_at > now()) AS last_retry_at
    FROM campaignd.recipients
    WHERE campaign_id = c.id
) r
WHERE c.id = $1;

-- name: op_doctor_errors
-- Error codes by state: final failures and skips, and retries still pending. $1 campaign id
SELECT state, error_code, count(*) AS n, min(error_message) AS example
FROM campaignd.recipients
WHERE campaign_id = $1 AND error_code IS NOT NULL
GROUP BY state, error_code
ORDER BY n DESC, state, error_code;

-- name: op_doctor_claims
-- In-flight recipients by the claim that holds them. $1 campaign id
SELECT lease_owner, lease_epoch, count(*) AS n,
       min(lease_expires_at) AS first_expiry, max(lease_expires_at) AS last_expiry
FROM campaignd.recipients
WHERE campaign_id = $1 AND state = 'in_flight'
GROUP BY lease_owner, lease_epoch
ORDER BY n DESC, lease_owner, lease_epoch;

-- name: op_doctor_open_campaigns
-- The campaigns `campaignd doctor` looks at when none is named.
SELECT id FROM campaignd.campaigns
WHERE status IN ('sending', 'paused')
ORDER BY created_at, id;

-- name: op_doctor_paused_senders
-- How many campaigns each paused sender holds back: those the daemon paused with its
-- reason, and those still set to sending.
SELECT s.id, s.paused_reason,
       (SELECT count(*) FROM campaignd.campaigns c
        WHERE c.sender_id = s.id AND c.status = 'paused' AND c.status_reason = s.paused_reason) AS paused_campaigns,
       (SELECT count(*) FROM campaignd.campaigns c
        WHERE c.sender_id = s.id AND c.status = 'sending') AS sending_campaigns
FROM campaignd.senders s
WHERE s.paused_reason IS NOT NULL
ORDER BY s.id;
