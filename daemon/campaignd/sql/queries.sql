-- Every statement campaignd runs, by name. Loaded by campaignd.sql; callers use QUERIES["name"].
--
-- Fencing: a daemon serves a sender's campaigns only while it holds the sender lane
-- (senders.lease_owner, senders.lease_epoch). Every write made on behalf of a lane locks
-- the lane row FOR KEY SHARE with the writer's (owner, epoch): a takeover locks that row
-- FOR UPDATE (SKIP LOCKED) before bumping the epoch, so it cannot take a lane while a fenced
-- write is in progress, and any fenced write that starts after the takeover finds no lane
-- row and changes nothing. A daemon that stalled past its lease therefore cannot overwrite
-- what the new owner did. Every statement that takes a lane from its owner must take that
-- FOR UPDATE lock first: a plain UPDATE of the owner or epoch would not wait for KEY SHARE.
-- (The owner's own release_lane needs none: it runs once the lane's writes have ended.)
-- KEY SHARE and not SHARE so that the renewal, a plain UPDATE of lease_expires_at, never
-- waits for a write, which itself may wait for a host holding a campaign row.

-- name: migrations_lock_timeout
-- For the migration's transaction only (is_local): the session's own lock_timeout is back
-- after it. A parameter, which SET LOCAL cannot take. $1 e.g. '500ms'
SELECT set_config('lock_timeout', $1, true);

-- name: migrations_lock
-- One migrator at a time; the lock is released at the end of the transaction.
SELECT pg_advisory_xact_lock(hashtext('campaignd.migrate'));

-- name: migrations_bootstrap
CREATE SCHEMA IF NOT EXISTS campaignd;
CREATE TABLE IF NOT EXISTS campaignd.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version FROM campaignd.schema_migrations ORDER BY version;

-- name: migrations_record
INSERT INTO campaignd.schema_migrations (version, name) VALUES ($1, $2);

-- name: schema_exists
-- False when campaignd was never migrated into this database.
SELECT to_regclass('campaignd.schema_migrations') IS NOT NULL;

-- name: schema_version
SELECT max(version) FROM campaignd.schema_migrations;

-- name: listener_probe
-- Asked of the NOTIFY listener now and then: a listener that stopped hearing (a partition, a
-- failover that moved the server's address) says nothing of it until it is asked something.
SELECT 1;

-- name: upsert_sender
INSERT INTO campaignd.senders (id, provider, rate_per_second, burst, resend_in_doubt)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE
SET provider = EXCLUDED.provider,
    rate_per_second = EXCLUDED.rate_per_second,
    burst = EXCLUDED.burst,
    resend_in_doubt = EXCLUDED.resend_in_doubt,
    updated_at = now()
WHERE (senders.provider, senders.rate_per_second, senders.burst, senders.resend_in_doubt)
      IS DISTINCT FROM (EXCLUDED.provider, EXCLUDED.rate_per_second, EXCLUDED.burst, EXCLUDED.resend_in_doubt);

-- name: acquire_lanes
-- Takes up to $4 free or expired lanes of the given senders that have SENDING work.
-- SKIP LOCKED: two daemons polling at once split the lanes instead of queueing on them.
-- $1 sender ids, $2 owner, $3 lease seconds, $4 how many at most
WITH candidates AS (
    SELECT s.id, s.lease_owner AS previous_owner
    FROM campaignd.senders s
    WHERE s.id = ANY($1::text[])
      AND s.paused_reason IS NULL
      AND (s.lease_owner IS NULL OR s.lease_expires_at < now())
      AND EXISTS (SELECT 1 FROM campaignd.campaigns c WHERE c.sender_id = s.id AND c.status = 'sending')
    ORDER BY s.id
    LIMIT $4
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE campaignd.senders s
SET lease_owner = $2,
    lease_epoch = s.lease_epoch + 1,
    lease_expires_at = now() + make_interval(secs => $3),
    updated_at = now()
FROM candidates
WHERE s.id = candidates.id
RETURNING s.id, s.lease_epoch, candidates.previous_owner, s.pause_changes;

-- name: recover_orphaned_claims
-- Claims in flight under a lane that is no longer theirs (released, expired by the watchdog,
-- or taken over: its owner or epoch changed): nobody will record their outcome, so whether
-- the provider got them is unknown. They are resent with the same idempotency key, or failed
-- 'in_doubt', per the sender's policy; the lost claim spends no attempt. Run by a new lane
-- owner for its sender right after acquiring ($1 = sender id), and by the watchdog for every
-- sender ($1 = NULL).
-- Only fenced lanes: a lease that ran out but still names its owner and epoch may yet be
-- renewed, and that owner's outcomes would then find their rows taken (a sent message
-- resent, or failed 'in_doubt'); wd_expire_lanes fences it first. The sender row is locked
-- too (KEY SHARE, which renewals and claims do not conflict with), so that a claim row
-- changed during this statement (a new owner recovered it and claimed it again) is judged
-- against the sender row as it is now, not as this statement's snapshot saw it.
WITH orphan AS (
    SELECT r.id, s.resend_in_doubt AS resend
    FROM campaignd.recipients r
    JOIN campaignd.campaigns c ON c.id = r.campaign_id
    JOIN campaignd.senders s ON s.id = c.sender_id
    WHERE r.state = 'in_flight'
      AND ($1::text IS NULL OR c.sender_id = $1)
      AND NOT (s.lease_owner IS NOT DISTINCT FROM r.lease_owner
               AND s.lease_epoch IS NOT DISTINCT FROM r.lease_epoch)
    FOR UPDATE OF r SKIP LOCKED
    FOR KEY SHARE OF s SKIP LOCKED
), recovered AS (
    UPDATE campaignd.recipients r
    SET state = CASE WHEN orphan.resend THEN 'pending' ELSE 'failed' END,
        attempts = greatest(r.attempts - 1, 0),
        next_attempt_at = CASE WHEN orphan.resend THEN now() END,
        error_code = 'in_doubt',
        error_message = 'the daemon holding this claim stopped before recording its outcome',
        maybe_delivered = true,
        lease_owner = NULL, lease_epoch = NULL, lease_expires_at = NULL, lease_claim = NULL,
        updated_at = now()
    FROM orphan
    WHERE r.id = orphan.id
    RETURNING r.campaign_id, r.state
), per_campaign AS (
    SELECT campaign_id,
           count(*) FILTER (WHERE state = 'pending') AS resent,
           count(*) FILTER (WHERE state = 'failed') AS failed
    FROM recovered
    GROUP BY campaign_id
), counted AS (
    UPDATE campaignd.campaigns c
    SET failed_count = c.failed_count + p.failed, updated_at = now()
    FROM per_campaign p
    WHERE c.id = p.campaign_id AND p.failed > 0
)
SELECT p.campaign_id, c.sender_id, p.resent, p.failed
FROM per_campaign p JOIN campaignd.campaigns c ON c.id = p.campaign_id;

-- name: release_lost_claims
-- Claims this lane made but never heard back about: the claim committed, and the reply was
-- lost with its connection. The lane sends only what it knows it claimed, so nothing was
-- sent for them, and they are given back like any unsent claim (due at once, the attempt
-- returned), not resent as in doubt. The caller runs this only for campaigns it has no
-- claim outstanding in: every claim of its epoch in flight there is then lost, or settled
-- with its outcome not yet written ($5).
-- Rows locked right now (a claim whose commit is still under way) are left to the next call,
-- or, from a lane that is stopping, to the next owner, which recovers them as in doubt.
-- $1 sender id, $2 owner, $3 epoch, $4 campaign ids, $5 recipient ids whose outcome the lane
-- holds but has not written yet (claims it knows of, not lost)
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
), lost AS (
    SELECT r.id FROM campaignd.recipients r
    WHERE r.campaign_id = ANY($4::uuid[]) AND r.state = 'in_flight'
      AND r.lease_owner = $2 AND r.lease_epoch = $3
      AND r.id <> ALL($5::bigint[])
      AND EXISTS (SELECT 1 FROM lane)
    FOR UPDATE OF r SKIP LOCKED
), released AS (
    UPDATE campaignd.recipients r
    SET state = 'pending',
        attempts = greatest(r.attempts - 1, 0),
        next_attempt_at = now(),
        error_code = NULL, error_message = NULL,
        lease_owner = NULL, lease_epoch = NULL, lease_expires_at = NULL, lease_claim = NULL,
        updated_at = now()
    FROM lost
    WHERE r.id = lost.id
    RETURNING r.campaign_id
)
SELECT campaign_id, count(*) AS released FROM released GROUP BY campaign_id;

-- name: renew_lane
-- Extends the lane and, for operators, the leases shown on its in-flight claims and its
-- campaigns. No row back: the lane was taken over (or released), and the caller must stop
-- sending at once. A renewal must never queue behind a batch write, or a slow batch would
-- let the lease lapse: the lane row's writers hold it FOR KEY SHARE, which this UPDATE does
-- not wait for, and claim rows locked right now are skipped (they are being settled, or are
-- refreshed on the next renewal).
-- $1 sender id, $2 owner, $3 epoch, $4 lease seconds, $5 campaign ids with claims in flight
WITH lane AS (
    UPDATE campaignd.senders
    SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    RETURNING lease_expires_at, paused_reason, pause_changes
), free_claims AS (
    SELECT r.id FROM campaignd.recipients r
    WHERE r.campaign_id = ANY($5::uuid[]) AND r.state = 'in_flight'
      AND r.lease_owner = $2 AND r.lease_epoch = $3
    FOR NO KEY UPDATE SKIP LOCKED
), claims AS (
    UPDATE campaignd.recipients r
    SET lease_expires_at = lane.lease_expires_at
    FROM lane, free_claims
    WHERE r.id = free_claims.id
), free_campaigns AS (
    SELECT c.id FROM campaignd.campaigns c
    WHERE c.sender_id = $1 AND c.status = 'sending'
    FOR NO KEY UPDATE SKIP LOCKED
), campaigns AS (
    UPDATE campaignd.campaigns c
    SET lease_owner = $2, lease_expires_at = lane.lease_expires_at
    FROM lane, free_campaigns
    WHERE c.id = free_campaigns.id
)
SELECT lease_expires_at, paused_reason, pause_changes FROM lane;

-- name: release_lane
-- Wakes the other daemons (at commit), so that a lane given up with work left, by a
-- daemon stopping or handing it over, is taken at once rather than at their next poll.
-- $1 sender id, $2 owner, $3 epoch
WITH lane AS (
    UPDATE campaignd.senders
    SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    RETURNING id
), campaigns AS (
    UPDATE campaignd.campaigns c
    SET lease_owner = NULL, lease_expires_at = NULL
    FROM lane
    WHERE c.sender_id = lane.id AND c.lease_owner = $2
)
SELECT pg_notify('campaignd_work', lane.id) FROM lane;

-- name: announce_daemon
-- A daemon's presence, refreshed, and every other live daemon with the senders it serves
-- and the lanes it holds now (from the leases, not from what it said). Rows of daemons gone
-- for a day are dropped on the way. $1 owner, $2 senders served, $3 seconds the row counts,
-- $4 true on the process's first announcement (an owner name can come back after a restart)
WITH me AS (
    INSERT INTO campaignd.daemons (owner, senders, expires_at)
    VALUES ($1, $2, now() + make_interval(secs => $3))
    ON CONFLICT (owner) DO UPDATE
    SET senders = EXCLUDED.senders, seen_at = now(), expires_at = EXCLUDED.expires_at,
        started_at = CASE WHEN $4 THEN now() ELSE daemons.started_at END
), forgotten AS (
    DELETE FROM campaignd.daemons WHERE expires_at < now() - interval '1 day'
)
SELECT d.owner, d.senders,
       (SELECT count(*) FROM campaignd.senders s
        WHERE s.lease_owner = d.owner AND s.lease_expires_at > now()) AS lanes
FROM campaignd.daemons d
WHERE d.owner <> $1 AND d.expires_at > now();

-- name: retire_daemon
-- $1 owner
DELETE FROM campaignd.daemons WHERE owner = $1;

-- name: sending_campaigns
-- $1 sender id
SELECT id, message, rate_per_second, prepared_at IS NOT NULL AS prepared, status_changes
FROM campaignd.campaigns
WHERE sender_id = $1 AND status = 'sending'
ORDER BY created_at, id;

-- name: lock_lane
-- First statement of a fenced multi-statement transaction. $1 sender id, $2 owner, $3 epoch
SELECT id FROM campaignd.senders
WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
FOR KEY SHARE;

-- name: prepare_hold_campaign
-- First statement of a preparation (after the lane's lock): a cancel, which locks the
-- campaign row before skipping its pending recipients, waits for the preparation instead of
-- deadlocking with it on the recipients both would skip. KEY SHARE does not hold off the
-- outcome writes, which lock the row FOR NO KEY UPDATE. $1 campaign id
SELECT id FROM campaignd.campaigns WHERE id = $1 FOR KEY SHARE;

-- name: prepare_tail_statement_timeout
-- First statement of a tail's transaction: the statements that prepare the rest of a campaign
-- read all of it (its duplicates, its counters), and may take longer than the session's
-- statement_timeout, which is sized for the daemon's other statements. For this transaction
-- only (is_local): $1 times the session's. Returns it in milliseconds (0: the session has none).
WITH timeout AS (
    SELECT least(setting::bigint * $1::integer, 2147483647) AS ms
    FROM pg_settings
    WHERE name = 'statement_timeout'
)
SELECT ms, set_config('statement_timeout', ms::text, true) FROM timeout;

-- name: prepare_head_boundary
-- A campaign larger than its head ($2 fresh recipients) is prepared in two parts: the head
-- first, so that its sending starts at once, then the rest while the head is sent. Returns
-- the first fresh id after the head, or nothing when the campaign fits in its head.
--
-- A range of one campaign's fresh recipients is written as a row comparison on
-- (campaign_id, id), here and in the statements below, so that the primary key cannot serve
-- it: written as campaign_id = $1 AND id > x, the planner may walk the primary key from x,
-- through every row of the older campaigns below this one's ids (measured: 145 ms per
-- million older rows, for a claim that takes 0.5 ms from the index). recipients_campaign_state
-- can still serve it, followed by a sort; the claim, which runs for every batch, rules that
-- out with lock_fresh_recipients (migration 006), and these run once per campaign.
-- $1 campaign id, $2 head size
SELECT id
FROM campaignd.recipients
WHERE (campaign_id, id) > ($1::uuid, 0::bigint) AND (campaign_id, id) < ($1::uuid, 9223372036854775807::bigint)
  AND state = 'pending' AND next_attempt_at IS NULL
ORDER BY campaign_id, id
OFFSET $2
LIMIT 1;

-- The three skips below decide the fresh recipients with ids in [$2, $3): a head, a tail, or
-- a whole campaign. Fresh (never claimed) rows only: retries were prepared before their
-- first claim, and the condition lets the range be read from the recipients_fresh index.

-- name: prepare_skip_no_address
-- $1 campaign id, $2 first id, $3 id bound (excluded)
UPDATE campaignd.recipients
SET state = 'skipped', error_code = 'no_address',
    error_message = 'recipient has no address', updated_at = now()
WHERE (campaign_id, id) >= ($1::uuid, $2::bigint) AND (campaign_id, id) < ($1::uuid, $3::bigint)
  AND state = 'pending' AND next_attempt_at IS NULL
  AND (address IS NULL OR btrim(address) = '');

-- name: prepare_duplicates_without_nested_loops
-- Before prepare_skip_duplicates(_in_head), for that statement only (prepare_duplicates_done
-- after it): the planner may not join the range with the repeated addresses by a nested loop.
-- For phone numbers in a recipients table never analyzed (a new installation's first
-- campaigns, loaded and started before autovacuum looked) it chose one, and grouped the whole
-- campaign again for every recipient of the range: the rest of a 20,000-recipient campaign
-- outlasted a 30 s statement_timeout, and a bigger one timed out at every factor of the tail's
-- timeout and failed its campaign. Hashed (or merged), it is one pass: ~30 ms for that rest.
SET LOCAL enable_nestloop = off;

-- name: prepare_duplicates_done
SET LOCAL enable_nestloop TO DEFAULT;

-- name: prepare_skip_duplicates
-- The lowest id of each address among the recipients not skipped is kept; runs after the
-- other skips. Grouped by hashing, not sorted: only the addresses that repeat come out of the
-- grouping (1.2-1.4x faster than a window over the sorted campaign at 200k-1M recipients).
-- The whole campaign is grouped, so a tail's repeat of an address in its head is skipped;
-- only the recipients in the range are marked. A head recipient skipped when it was sent
-- (an address or a value the provider cannot take) keeps its address, as it would have had
-- the whole campaign been prepared before it was sent: only preparation's skips are left out.
-- $1 campaign id, $2 first id, $3 id bound (excluded), $4 whether addresses are phone numbers
-- (see campaignd.address_key, migration 009)
UPDATE campaignd.recipients r
SET state = 'skipped', error_code = 'duplicate_address',
    error_message = 'same address as recipient ' || d.kept_id, updated_at = now()
FROM (
    SELECT campaignd.address_key(address, $4) AS address_key, min(id) AS kept_id
    FROM campaignd.recipients
    WHERE campaign_id = $1 AND address IS NOT NULL
      AND (state <> 'skipped' OR error_code NOT IN ('no_address', 'missing_variable', 'duplicate_address'))
    GROUP BY 1
    HAVING count(*) > 1
) d
WHERE (r.campaign_id, r.id) >= ($1::uuid, $2::bigint) AND (r.campaign_id, r.id) < ($1::uuid, $3::bigint)
  AND r.state = 'pending' AND r.next_attempt_at IS NULL
  AND campaignd.address_key(r.address, $4) = d.address_key AND r.id <> d.kept_id;

-- name: prepare_skip_duplicates_in_head
-- prepare_skip_duplicates for a head: only the recipients below the head's bound are grouped
-- (the rest is not prepared yet, and grouping it would cost what the head saves). Those are
-- the fresh ones and those already claimed (sent, failed, in flight, retrying, or skipped
-- when sent), which are all in the prepared head (claims stay there); each part is read
-- through its own index.
-- $1 campaign id, $2 first id, $3 head bound (excluded), $4 as above
UPDATE campaignd.recipients r
SET state = 'skipped', error_code = 'duplicate_address',
    error_message = 'same address as recipient ' || d.kept_id, updated_at = now()
FROM (
    SELECT campaignd.address_key(address, $4) AS address_key, min(id) AS kept_id
    FROM (
        SELECT address, id FROM campaignd.recipients
        WHERE (campaign_id, id) > ($1::uuid, 0::bigint) AND (campaign_id, id) < ($1::uuid, $3::bigint)
          AND state = 'pending' AND next_attempt_at IS NULL
        UNION ALL
        SELECT address, id FROM campaignd.recipients
        WHERE campaign_id = $1 AND state IN ('in_flight', 'sent', 'failed')
        UNION ALL
        SELECT address, id FROM campaignd.recipients
        WHERE campaign_id = $1 AND state = 'skipped'
          AND error_code NOT IN ('no_address', 'missing_variable', 'duplicate_address')
        UNION ALL
        SELECT address, id FROM campaignd.recipients
        WHERE campaign_id = $1 AND state = 'pending' AND next_attempt_at IS NOT NULL
    ) not_skipped
    WHERE address IS NOT NULL
    GROUP BY 1
    HAVING count(*) > 1
) d
WHERE (r.campaign_id, r.id) >= ($1::uuid, $2::bigint) AND (r.campaign_id, r.id) < ($1::uuid, $3::bigint)
  AND r.state = 'pending' AND r.next_attempt_at IS NULL
  AND campaignd.address_key(r.address, $4) = d.address_key AND r.id <> d.kept_id;

-- name: prepare_skip_missing_variables
-- A variable that is absent or JSON null cannot fill a placeholder, and variables that are not
-- an object fill none. The test is one operator per row (every name a key once nulls are
-- stripped), not a list of names unnested for every row: 1.7-2.3x faster at 200k-1M
-- recipients; only the rows skipped list their missing names.
-- $1 campaign id, $2 first id, $3 id bound (excluded), $4 names
UPDATE campaignd.recipients r
SET state = 'skipped', error_code = 'missing_variable',
    error_message = 'missing variable: ' || (
        SELECT string_agg(k, ', ' ORDER BY k) FROM unnest($4::text[]) AS k
        WHERE r.variables -> k IS NULL OR r.variables -> k = 'null'::jsonb),
    updated_at = now()
WHERE (r.campaign_id, r.id) >= ($1::uuid, $2::bigint) AND (r.campaign_id, r.id) < ($1::uuid, $3::bigint)
  AND r.state = 'pending' AND r.next_attempt_at IS NULL
  AND NOT coalesce(
      jsonb_typeof(r.variables) = 'object' AND jsonb_strip_nulls(r.variables) ?& $4::text[], false);

-- name: prepare_head_finish
-- The head is prepared: its fresh recipients below $2 may be claimed. Its skips are counted
-- now (whatever the status: they happened); the rest is counted when the tail is prepared.
-- $1 campaign id, $2 head bound (excluded), $3 recipients skipped
UPDATE campaignd.campaigns
SET prepared_below = $2,
    skipped_count = skipped_count + $3,
    started_at = coalesce(started_at, now()),
    updated_at = now()
WHERE id = $1
RETURNING status;

-- name: prepare_lock_campaign
-- Before prepare_finish counts, in a statement of its own: a batch of outcomes (which locks
-- the campaign row first) committed between the count's snapshot and its update would
-- otherwise be counted by neither. $1 campaign id
SELECT id FROM campaignd.campaigns WHERE id = $1 FOR NO KEY UPDATE;

-- name: prepare_finish
-- Counters recomputed from recipient states (hosts need not fill total_count), whatever the
-- status: the skips were made. A campaign left with nothing to send and nothing sent fails
-- with a reason instead of sitting in SENDING, paused included (a resume would complete it
-- having sent nothing); one whose head was sent completes as usual. complete_campaign and
-- wd_complete_finished fail a campaign left with nothing sent or failed with the same reason.
-- $1 campaign id
WITH counts AS (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE state = 'sent') AS sent,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'skipped') AS skipped,
           count(*) FILTER (WHERE state IN ('pending', 'in_flight')) AS open
    FROM campaignd.recipients
    WHERE campaign_id = $1
), verdict AS (
    SELECT counts.*,
           c.status IN ('sending', 'paused') AND counts.open = 0 AND counts.sent = 0 AND counts.failed = 0 AS fails
    FROM counts, campaignd.campaigns c
    WHERE c.id = $1
)
UPDATE campaignd.campaigns c
SET total_count = v.total,
    sent_count = v.sent,
    failed_count = v.failed,
    skipped_count = v.skipped,
    prepared_at = now(),
    started_at = coalesce(c.started_at, now()),
    status = CASE WHEN v.fails THEN 'failed' ELSE c.status END,
    status_reason = CASE
        WHEN NOT v.fails THEN c.status_reason
        WHEN v.total = 0 THEN 'campaign has no recipients'
        ELSE 'no valid recipient: all ' || v.total || ' were skipped' END,
    completed_at = CASE WHEN v.fails THEN now() ELSE c.completed_at END,
    updated_at = now()
FROM verdict v
WHERE c.id = $1
RETURNING c.status, c.status_reason, v.total, v.skipped, v.open;

-- name: fail_campaign
-- A campaign that cannot be sent at all (its message does not compile, it fails the
-- pre-flight, its rest cannot be prepared) ends failed. Only the campaign row: its pending
-- recipients are ended by the watchdog's sweep (wd_sweep_ended: skipped 'campaign_failed'
-- with this reason, a resend of a send in doubt failed 'in_doubt'), a chunk a statement, and
-- a campaign never prepared gets its total_count there (wd_count_ended_totals). Ending them
-- here made this one statement rewrite every pending recipient: past statement_timeout (some
-- millions of them) it was retried, as an outage, at every refresh of the lane, and the
-- sender's other campaigns were never claimed again. Recipients in flight are left to the
-- lane that holds them.
-- $1 sender id, $2 owner, $3 epoch, $4 campaign id, $5 reason
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
)
UPDATE campaignd.campaigns
SET status = 'failed', status_reason = $5, completed_at = now(), updated_at = now(),
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $4 AND status = 'sending' AND EXISTS (SELECT 1 FROM lane)
RETURNING id;

-- name: pause_campaign
-- The provider rejected the campaign's message, or its failures tripped the circuit breaker.
-- Only while its status is the one the lane last saw ($6, campaigns.status_changes): written
-- again after a lost reply, the pause must not undo a resume that came in between.
-- Returns whether it paused it, and, when it did not, the campaign's status and reason (an
-- earlier attempt whose reply was lost shows as paused with this reason).
-- $1 sender id, $2 owner, $3 epoch, $4 campaign id, $5 reason, $6 status changes seen
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
), paused AS (
    UPDATE campaignd.campaigns
    SET status = 'paused', status_reason = $5, updated_at = now()
    WHERE id = $4 AND status = 'sending' AND status_changes = $6 AND EXISTS (SELECT 1 FROM lane)
    RETURNING id
)
-- The campaign as it was before this statement: read in the same snapshot as the UPDATE.
SELECT EXISTS (SELECT 1 FROM paused) AS paused, status, status_reason
FROM campaignd.campaigns
WHERE id = $4;

-- name: preflight_sample
-- The first recipients to be sent, for the pre-flight check (matches recipients_fresh).
-- $1 campaign id, $2 first id, $3 id bound (excluded), $4 how many
SELECT address, variables
FROM campaignd.recipients
WHERE (campaign_id, id) >= ($1::uuid, $2::bigint) AND (campaign_id, id) < ($1::uuid, $3::bigint)
  AND state = 'pending' AND next_attempt_at IS NULL
ORDER BY campaign_id, id
LIMIT $4;

-- name: claim_recipients
-- Due retries first, then fresh recipients after the keyset cursor. The claim commits
-- before any send starts, so a crash leaves the recipient visibly in_flight (in doubt),
-- never silently pending-but-sent.
-- $1 sender id, $2 owner, $3 epoch, $4 campaign id, $5 cursor (last fresh id claimed),
-- $6 limit, $7 lease seconds, $8 the lane's number for this claim
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
), campaign AS (
    -- Fresh recipients are claimed only once prepared: all of them, or the head while the
    -- rest is prepared (nothing before the campaign is prepared at all).
    SELECT id,
           CASE WHEN prepared_at IS NOT NULL THEN 9223372036854775807
                ELSE coalesce(prepared_below, 0) END AS fresh_below
    FROM campaignd.campaigns
    WHERE id = $4 AND status = 'sending' AND EXISTS (SELECT 1 FROM lane)
), due AS (
    SELECT r.id
    FROM campaignd.recipients r
    WHERE r.campaign_id = (SELECT id FROM campaign)
      AND r.state = 'pending' AND r.next_attempt_at IS NOT NULL AND r.next_attempt_at <= now()
    ORDER BY r.next_attempt_at
    LIMIT $6
    FOR UPDATE SKIP LOCKED
), fresh AS (
    -- In recipients_fresh's order, never through a sort (see migration 006).
    SELECT f.id
    FROM campaignd.lock_fresh_recipients(
        (SELECT id FROM campaign), $5::bigint, (SELECT fresh_below FROM campaign), $6::integer
    ) AS f(id)
), picked AS (
    (SELECT id, false AS fresh FROM due)
    UNION ALL
    (SELECT id, true AS fresh FROM fresh)
    LIMIT $6
)
UPDATE campaignd.recipients r
SET state = 'in_flight',
    attempts = r.attempts + 1,
    lease_owner = $2,
    lease_epoch = $3,
    lease_expires_at = now() + make_interval(secs => $7),
    lease_claim = $8,
    updated_at = now()
FROM picked
WHERE r.id = picked.id
-- variables as json, not jsonb: json's wire format is the bare text, which the client decodes
-- in one call, where jsonb's carries a version byte to strip first (one more per message).
-- error_code and error_message are unchanged by the claim: a retry's last verdict, by which
-- the send path tells a verdict repeated after a resume (outcomes.decide); NULL when fresh.
RETURNING r.id, r.address, r.variables::json AS variables, r.attempts, picked.fresh,
          r.error_code, r.error_message;

-- name: record_outcomes_begin
-- record_outcomes runs in a transaction of its own (record_outcomes_commit after it), planned
-- without nested loops. In a recipients table never analyzed (a new installation's first
-- campaigns), from some 500,000 rows the planner took a lane's in-flight claims for one row
-- and joined them with the batch's outcomes by a nested loop that read all 1,000 outcomes for
-- each claim: 170-250 ms a batch instead of ~8, a lane held near 4,000 messages a second until
-- autovacuum analyzed the table. Hashed, it is one pass over the batch at any size.
BEGIN;
SET LOCAL enable_nestloop = off;

-- name: record_outcomes_commit
-- Its own text, not asyncpg's "COMMIT;": a test loses the reply to this commit alone.
COMMIT;

-- name: record_outcomes_rollback
ROLLBACK;

-- name: record_outcomes
-- One statement per batch: recipient states and campaign counters change together, and
-- only for claims this lane still holds. Returns whether the lane was still ours and how
-- many outcomes were applied.
-- $1 sender id, $2 owner, $3 epoch, then parallel arrays: $4 ids, $5 states,
-- $6 provider message ids, $7 error codes, $8 error messages, $9 retry delays (seconds,
-- for state pending), $10 attempt adjustments (-1 gives back an attempt not spent), $11 the
-- claim each outcome was decided for, $12 whether this send may have been delivered (its
-- request left unanswered: kept on the row for good). Any array but the ids may be NULL for
-- "only the default in this batch" (unnest pads it with NULLs): state 'sent', no texts, no
-- delay, no adjustment, no claim number, not in doubt (outcomes.outcome_columns).
-- A batch whose reply was lost is written again. An outcome that leaves the row pending
-- must then not land on a later claim of it by this lane, so it names its claim (and is
-- not applied without one); a final outcome needs no number: once it has committed, the
-- row can never be claimed again.
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
), campaign_locks AS (
    -- The campaign rows are locked before their recipients, the order in which a host's
    -- DELETE of a campaign (cascading to its recipients) takes them: a host deleting a
    -- campaign mid-send waits for this batch instead of deadlocking with it.
    -- Rows found by key from arrays, here and below, never by a join: planned without nested
    -- loops (record_outcomes_begin), a join would read every campaign, or every lane's
    -- claims, to find a batch's own.
    SELECT c.id FROM campaignd.campaigns c
    WHERE c.id = ANY (ARRAY(SELECT DISTINCT r.campaign_id FROM campaignd.recipients r
                            WHERE r.id = ANY($4::bigint[])))
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
), outcome AS (
    SELECT id, coalesce(state, 'sent') AS state, provider_message_id, error_code, error_message,
           retry_in, coalesce(attempt_adjust, 0) AS attempt_adjust, claim,
           coalesce(maybe_delivered, false) AS maybe_delivered
    FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::float8[], $10::int[],
                $11::bigint[], $12::boolean[])
         AS o(id, state, provider_message_id, error_code, error_message, retry_in, attempt_adjust, claim,
              maybe_delivered)
), applied AS (
    UPDATE campaignd.recipients r
    SET state = o.state,
        attempts = greatest(r.attempts + o.attempt_adjust, 0),
        next_attempt_at = CASE WHEN o.state = 'pending' THEN now() + make_interval(secs => o.retry_in) END,
        provider_message_id = coalesce(o.provider_message_id, r.provider_message_id),
        error_code = o.error_code,
        error_message = o.error_message,
        sent_at = CASE WHEN o.state = 'sent' THEN now() ELSE r.sent_at END,
        maybe_delivered = r.maybe_delivered OR o.maybe_delivered,
        lease_owner = NULL, lease_epoch = NULL, lease_expires_at = NULL, lease_claim = NULL,
        updated_at = now()
    FROM outcome o
    WHERE r.id = o.id AND r.id = ANY($4::bigint[])
      AND r.state = 'in_flight' AND r.lease_owner = $2 AND r.lease_epoch = $3
      AND (r.lease_claim = o.claim OR (o.claim IS NULL AND o.state <> 'pending'))
      AND EXISTS (SELECT 1 FROM lane)
      AND r.campaign_id = ANY (ARRAY(SELECT id FROM campaign_locks))
    RETURNING r.campaign_id, r.state
), per_campaign AS (
    SELECT campaign_id,
           count(*) FILTER (WHERE state = 'sent') AS sent,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'skipped') AS skipped
    FROM applied
    GROUP BY campaign_id
), counted AS (
    UPDATE campaignd.campaigns c
    SET sent_count = c.sent_count + p.sent,
        failed_count = c.failed_count + p.failed,
        skipped_count = c.skipped_count + p.skipped,
        updated_at = now()
    FROM per_campaign p
    WHERE c.id = p.campaign_id AND c.id = ANY (ARRAY(SELECT campaign_id FROM per_campaign))
      AND (p.sent + p.failed + p.skipped) > 0
)
SELECT (SELECT count(*) FROM lane) AS lane_held,
       (SELECT count(*) FROM applied) AS applied;

-- name: complete_campaign
-- The only way a campaign becomes completed: atomically, while still SENDING, and only
-- when no recipient is pending (a retry scheduled in the future counts as pending) or
-- in flight. A campaign that sent nothing and failed nothing (every recipient skipped, by
-- the preparation or when it was to be sent: an address or a value the provider cannot
-- take) fails instead, with prepare_finish's reason, as wd_complete_finished does.
-- Returns the status it ended with. $1 sender id, $2 owner, $3 epoch, $4 campaign id
WITH lane AS (
    SELECT id FROM campaignd.senders
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
    FOR KEY SHARE
), verdict AS (
    -- Any recipient sent or failed, from recipients_campaign_state: stops at the first.
    SELECT NOT EXISTS (
        SELECT 1 FROM campaignd.recipients r
        WHERE r.campaign_id = $4 AND r.state IN ('sent', 'failed')) AS fails
)
UPDATE campaignd.campaigns c
SET status = CASE WHEN v.fails THEN 'failed' ELSE 'completed' END,
    status_reason = CASE
        WHEN NOT v.fails THEN c.status_reason
        ELSE (SELECT CASE WHEN count(*) = 0 THEN 'campaign has no recipients'
                          ELSE 'no valid recipient: all ' || count(*) || ' were skipped' END
              FROM campaignd.recipients r WHERE r.campaign_id = c.id) END,
    completed_at = now(), updated_at = now(),
    lease_owner = NULL, lease_expires_at = NULL
FROM verdict v
WHERE c.id = $4 AND c.status = 'sending'
  AND EXISTS (SELECT 1 FROM lane)
  AND NOT EXISTS (
      SELECT 1 FROM campaignd.recipients r
      WHERE r.campaign_id = c.id AND r.state IN ('pending', 'in_flight'))
RETURNING c.total_count, c.sent_count, c.failed_count, c.skipped_count, c.status, c.status_reason;

-- name: pause_sender
-- The provider rejected the sender itself, or an operator or host paused it: stop it and
-- every campaign it is sending. Returns the sender's reason (NULL: nothing paused, the lane
-- was taken over or, see $5, the pause lifted) and the campaigns paused.
-- $1 sender id, $2 owner, $3 epoch, $4 reason, $5 whether the pause was seen in the database,
-- $6 the sender's pause_changes as the lane last saw it.
-- Applied while the sender is paused, whoever paused it; otherwise only for a provider's
-- verdict, and only if the sender has not been paused and resumed since the lane looked ($6):
-- a pause seen in the database and lifted since, or a verdict written again after a lost reply
-- while an operator resumed the sender, would undo that resume.
-- A pause already in place keeps its reason, which is what the operator was told; the
-- campaigns take the sender's reason, which is how resume-sender finds them.
WITH lane AS (
    UPDATE campaignd.senders
    SET paused_reason = coalesce(paused_reason, $4), updated_at = now()
    WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
      AND (paused_reason IS NOT NULL OR (NOT $5 AND pause_changes = $6))
    RETURNING id, paused_reason
), paused AS (
    UPDATE campaignd.campaigns c
    SET status = 'paused', status_reason = lane.paused_reason, updated_at = now()
    FROM lane
    WHERE c.sender_id = lane.id AND c.status = 'sending'
    RETURNING c.id
)
SELECT (SELECT paused_reason FROM lane) AS paused_reason,
       ARRAY(SELECT id FROM paused ORDER BY id) AS campaign_ids;

-- name: campaign_status_all
SELECT c.id, c.name, c.sender_id, c.status, c.status_reason, c.total_count, c.sent_count,
       c.failed_count, c.skipped_count, c.lease_owner, c.created_at, c.started_at, c.completed_at,
       (SELECT count(*) FROM campaignd.recipients r
        WHERE r.campaign_id = c.id AND r.state IN ('pending', 'in_flight')) AS open_count
FROM campaignd.campaigns c
ORDER BY c.created_at DESC, c.id
LIMIT $1;

-- name: campaign_status_one
SELECT c.id, c.name, c.sender_id, c.status, c.status_reason, c.total_count, c.sent_count,
       c.failed_count, c.skipped_count, c.lease_owner, c.created_at, c.started_at, c.completed_at,
       (SELECT count(*) FROM campaignd.recipients r
        WHERE r.campaign_id = c.id AND r.state IN ('pending', 'in_flight')) AS open_count
FROM campaignd.campaigns c
WHERE c.id = $1;

-- name: campaign_state_counts
SELECT state, count(*) AS n FROM campaignd.recipients WHERE campaign_id = $1 GROUP BY state;

-- name: campaign_error_counts
SELECT state, error_code, count(*) AS n
FROM campaignd.recipients
WHERE campaign_id = $1 AND error_code IS NOT NULL
GROUP BY state, error_code
ORDER BY n DESC;
