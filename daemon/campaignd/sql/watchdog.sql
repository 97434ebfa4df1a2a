-- The watchdog's statements. One daemon's watchdog runs a pass at a time (advisory lock);
-- it never sends, and it never completes a campaign that has pending or in-flight work.

-- name: wd_try_lock
SELECT pg_try_advisory_lock(hashtext('campaignd.watchdog'));

-- name: wd_unlock
SELECT pg_advisory_unlock(hashtext('campaignd.watchdog'));

-- name: wd_end_idle_lock_holder
-- Ends the session that holds the watchdog's lock while it has waited on its client for more
-- than $1 seconds (idle, or in the middle of a statement's messages): no live pass leaves it
-- waiting that long. It is a daemon's session that the server still thinks alive after the
-- daemon lost it mid-pass (a partition, a failover that moved the daemon's address), or a
-- daemon frozen mid-pass: left alone, it kept the lock, and every watchdog skipped its passes,
-- until TCP keepalive ended it (about two hours by default; never for a frozen process).
-- Waits up to 1 s for it to exit (an idle backend exits at once), so the lock is free on
-- return. pg_locks shows the lock's bigint key as its high and low 32 bits. Only sessions
-- this role may see (its own, or all with pg_read_all_stats) are found, and none where
-- track_activities is off. $1 must exceed the pool's idle lifetime (watchdog.py).
WITH lock_key AS (SELECT hashtext('campaignd.watchdog')::int8 AS k)
SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr,
       extract(epoch FROM now() - a.state_change)::float8 AS idle_seconds,
       pg_terminate_backend(a.pid, 1000) AS ended
FROM pg_locks l
CROSS JOIN lock_key
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = ((lock_key.k >> 32) & 4294967295)::oid
  AND l.objid = (lock_key.k & 4294967295)::oid
  AND a.wait_event_type = 'Client' AND a.wait_event = 'ClientRead'
  AND a.state_change < now() - make_interval(secs => $1)
  AND a.pid <> pg_backend_pid();

-- name: wd_expire_lanes
-- Lanes whose owner stopped renewing: released, and the epoch bumped so that the old owner,
-- should it wake up, is fenced out of every write.
WITH expired AS (
    SELECT id FROM campaignd.senders
    WHERE lease_owner IS NOT NULL AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
)
UPDATE campaignd.senders s
SET lease_owner = NULL, lease_expires_at = NULL, lease_epoch = s.lease_epoch + 1, updated_at = now()
FROM expired
WHERE s.id = expired.id
RETURNING s.id;

-- name: wd_sweep_ended
-- Claims given back after their campaign was cancelled or failed land as pending; they end
-- like the rest of the campaign's pending recipients did (op_cancel_pending, fail_campaign):
-- skipped 'cancelled' or 'campaign_failed', but one waiting for a resend of a send the
-- provider may have delivered (campaignd.sent_in_doubt, migration 012), failed 'in_doubt'
-- (as with resend_in_doubt = false). The
-- counters are raised by exactly the rows changed, under the campaign row's lock.
-- At most $1 recipients a call, so that no statement grows with the data: a campaign a host
-- cancelled with an UPDATE leaves every recipient pending (millions, maybe), and one
-- statement over them all outlasted statement_timeout, pass after pass. The caller calls
-- again until a call ends fewer than $1 (watchdog.Watchdog._sweep_ended). For the same
-- reason a campaign never prepared has its total_count counted by wd_count_ended_totals,
-- once it has nothing pending, not by each call (until then it keeps 0, "not counted yet",
-- as before its preparation).
-- The campaign rows are locked before their recipients, the order outcomes, a cancel and a
-- host's DELETE of a campaign take them. One locked right now, and recipient rows locked
-- right now (a claim being given back), are left to a later call, like the other watchdog
-- writes: two calls at once never change the same row, nor count it twice.
-- $1 how many recipients at most
WITH ended AS (
    SELECT c.id
    FROM campaignd.campaigns c
    WHERE c.status IN ('cancelled', 'failed')
      AND EXISTS (
          SELECT 1 FROM campaignd.recipients r WHERE r.campaign_id = c.id AND r.state = 'pending')
    FOR NO KEY UPDATE OF c SKIP LOCKED
), picked AS (
    SELECT r.id
    FROM campaignd.recipients r
    WHERE r.campaign_id = ANY (ARRAY(SELECT id FROM ended)) AND r.state = 'pending'
    LIMIT $1
    FOR UPDATE OF r SKIP LOCKED
), swept AS (
    -- Found by id alone, through the primary key, and nothing joined: with the campaign (or
    -- ended) joined, a planner that misjudged the row counts (statistics not yet gathered
    -- on a table just filled) read every pending recipient of the campaign and compared each
    -- with the ids picked: seconds for a chunk of 5,000 among 200,000. The campaign's status
    -- and reason (final, and its row locked above) are looked up by primary key.
    UPDATE campaignd.recipients r
    SET state = CASE WHEN campaignd.sent_in_doubt(r) THEN 'failed' ELSE 'skipped' END,
        error_code = CASE
            WHEN campaignd.sent_in_doubt(r) THEN 'in_doubt'
            ELSE (SELECT CASE WHEN c.status = 'cancelled' THEN 'cancelled' ELSE 'campaign_failed' END
                  FROM campaignd.campaigns c WHERE c.id = r.campaign_id) END,
        error_message = CASE
            WHEN campaignd.sent_in_doubt(r) THEN campaignd.in_doubt_reason(r, 'the campaign ended')
            ELSE (SELECT CASE WHEN c.status = 'cancelled' THEN 'campaign cancelled'
                              ELSE coalesce(c.status_reason, 'campaign failed') END
                  FROM campaignd.campaigns c WHERE c.id = r.campaign_id) END,
        next_attempt_at = NULL, updated_at = now()
    WHERE r.id = ANY (ARRAY(SELECT id FROM picked)) AND r.state = 'pending'
    RETURNING r.campaign_id, r.state
), per_campaign AS (
    SELECT campaign_id,
           count(*) FILTER (WHERE state = 'skipped') AS skipped,
           count(*) FILTER (WHERE state = 'failed') AS failed
    FROM swept GROUP BY campaign_id
), counted AS (
    UPDATE campaignd.campaigns c
    SET skipped_count = c.skipped_count + p.skipped, failed_count = c.failed_count + p.failed,
        updated_at = now()
    FROM per_campaign p
    WHERE c.id = p.campaign_id
    RETURNING c.id, c.status
)
SELECT p.campaign_id, counted.status, p.skipped, p.failed
FROM per_campaign p JOIN counted ON counted.id = p.campaign_id;

-- name: wd_count_ended_totals
-- A cancelled or failed campaign never prepared has no total_count yet (0: one a host
-- cancelled with an UPDATE, one failed by a version that left its recipients pending):
-- counted here once wd_sweep_ended has left nothing of it pending, in a statement of its
-- own, the last write of a pass, as it reads every recipient of the campaign. Which ones need it is told
-- by the counters: fewer in total than ended. A campaign row locked right now is left to the
-- next pass. Leaves updated_at alone, like wd_set_counters: a count is no progress.
WITH uncounted AS (
    SELECT c.id
    FROM campaignd.campaigns c
    WHERE c.status IN ('cancelled', 'failed') AND c.prepared_at IS NULL
      AND c.total_count < c.sent_count + c.failed_count + c.skipped_count
      AND NOT EXISTS (
          SELECT 1 FROM campaignd.recipients r WHERE r.campaign_id = c.id AND r.state = 'pending')
    FOR NO KEY UPDATE OF c SKIP LOCKED
)
UPDATE campaignd.campaigns c
SET total_count = (SELECT count(*) FROM campaignd.recipients r WHERE r.campaign_id = c.id)
FROM uncounted u
WHERE c.id = u.id;

-- name: wd_complete_finished
-- SENDING campaigns whose recipients are all final: completed even if the lane that sent
-- them died before its own completion statement (the "test 6" report); or, like
-- complete_campaign, failed with prepare_finish's reason when nothing was sent or failed
-- (every recipient skipped). Their counters are
-- recounted in the same statement, so that a completion (and its log line) carries the true
-- counts even when they had drifted: the drift check walks its candidates a batch per pass
-- and may not have reached the campaign yet. Returns the counters it found too, to report
-- drift.
-- A campaign row locked right now is left to the next pass, like the other watchdog writes
-- (a lane recording outcomes or completing it holds it; the watchdog never waits on a lane).
-- Locking it before reading its counters makes them the ones this statement overwrites.
-- The counts cannot miss an outcome committed concurrently: outcomes only land on rows in
-- flight, and a campaign with a row pending or in flight in this statement's snapshot is
-- not completed.
WITH finished AS (
    SELECT c.id, c.sent_count, c.failed_count, c.skipped_count, c.total_count
    FROM campaignd.campaigns c
    WHERE c.status = 'sending' AND c.prepared_at IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM campaignd.recipients r
          WHERE r.campaign_id = c.id AND r.state IN ('pending', 'in_flight'))
    FOR NO KEY UPDATE OF c SKIP LOCKED
), counts AS (
    SELECT r.campaign_id,
           count(*) FILTER (WHERE r.state = 'sent') AS sent,
           count(*) FILTER (WHERE r.state = 'failed') AS failed,
           count(*) FILTER (WHERE r.state = 'skipped') AS skipped,
           count(*) AS total
    FROM campaignd.recipients r
    WHERE r.campaign_id IN (SELECT id FROM finished)
    GROUP BY r.campaign_id
)
UPDATE campaignd.campaigns c
SET status = CASE WHEN coalesce(n.sent, 0) = 0 AND coalesce(n.failed, 0) = 0 THEN 'failed' ELSE 'completed' END,
    status_reason = CASE
        WHEN coalesce(n.sent, 0) > 0 OR coalesce(n.failed, 0) > 0 THEN c.status_reason
        WHEN coalesce(n.total, 0) = 0 THEN 'campaign has no recipients'
        ELSE 'no valid recipient: all ' || n.total || ' were skipped' END,
    completed_at = now(), updated_at = now(),
    stuck_since = NULL, stuck_reason = NULL, lease_owner = NULL, lease_expires_at = NULL,
    sent_count = coalesce(n.sent, 0), failed_count = coalesce(n.failed, 0),
    skipped_count = coalesce(n.skipped, 0), total_count = coalesce(n.total, 0)
FROM finished f
LEFT JOIN counts n ON n.campaign_id = f.id
WHERE c.id = f.id
RETURNING c.id, c.sender_id, c.status, c.status_reason,
          c.total_count, c.sent_count, c.failed_count, c.skipped_count,
          f.total_count AS stored_total, f.sent_count AS stored_sent,
          f.failed_count AS stored_failed, f.skipped_count AS stored_skipped;

-- name: wd_drift_candidates
-- Campaigns whose counters matter now: in progress, or finished in the last $1 seconds.
-- Not before campaignd prepared them: until then total_count is legitimately 0.
-- Each candidate costs a count of its recipients, so a pass checks at most $3 of them: the
-- next ones after the last campaign id checked ($2; NULL: from the first), a walk over all
-- candidates that starts over once it reaches the last. The order must not depend on the
-- checks themselves (wd_set_counters leaves updated_at alone), or the same campaigns would
-- be picked pass after pass and the others never.
-- $1 seconds of recent history, $2 the last campaign id checked, $3 how many
SELECT id FROM campaignd.campaigns
WHERE prepared_at IS NOT NULL
  AND (status IN ('sending', 'paused') OR updated_at > now() - make_interval(secs => $1))
  AND ($2::uuid IS NULL OR id > $2::uuid)
ORDER BY id
LIMIT $3;

-- name: wd_lock_campaign_counters
-- Inside a REPEATABLE READ transaction: NOWAIT skips a campaign whose counters are being
-- written right now, and a write committed since the snapshot makes this fail with a
-- serialization error instead of "repairing" with stale counts. $1 campaign id
SELECT sent_count, failed_count, skipped_count, total_count
FROM campaignd.campaigns
WHERE id = $1
FOR UPDATE NOWAIT;

-- name: wd_count_states
-- $1 campaign id
SELECT count(*) FILTER (WHERE state = 'sent') AS sent,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'skipped') AS skipped,
       count(*) AS total
FROM campaignd.recipients
WHERE campaign_id = $1;

-- name: wd_set_counters
-- Leaves updated_at alone: that column means progress (wd_stuck_candidates), which a repair
-- is not. $1 campaign id, $2 sent, $3 failed, $4 skipped, $5 total
UPDATE campaignd.campaigns
SET sent_count = $2, failed_count = $3, skipped_count = $4, total_count = $5
WHERE id = $1;

-- name: wd_stuck_candidates
-- SENDING campaigns with no progress for $1 seconds, with what it takes to say why. One whose
-- head is prepared (prepared_below) has started, though the rest is not prepared yet.
SELECT c.id, c.sender_id, c.updated_at, c.rate_per_second AS campaign_rate,
       s.paused_reason, s.lease_owner, s.lease_expires_at,
       coalesce(s.lease_expires_at > now(), false) AS lane_live,
       s.rate_per_second AS sender_rate,
       p.pending, p.due, p.next_due,
       (c.prepared_at IS NOT NULL OR c.prepared_below IS NOT NULL) AS prepared
FROM campaignd.campaigns c
JOIN campaignd.senders s ON s.id = c.sender_id
CROSS JOIN LATERAL (
    SELECT count(*) AS pending,
           count(*) FILTER (WHERE r.next_attempt_at IS NULL OR r.next_attempt_at <= now()) AS due,
           min(r.next_attempt_at) FILTER (WHERE r.next_attempt_at > now()) AS next_due
    FROM campaignd.recipients r
    WHERE r.campaign_id = c.id AND r.state = 'pending'
) p
WHERE c.status = 'sending' AND c.updated_at < now() - make_interval(secs => $1);

-- name: wd_flag_stuck
-- Does not touch updated_at: that column means progress. $1 campaign id, $2 reason
UPDATE campaignd.campaigns
SET stuck_since = coalesce(stuck_since, now()), stuck_reason = $2
WHERE id = $1 AND status = 'sending'
RETURNING stuck_since;

-- name: wd_unflag_recovered
-- $1 stuck_after seconds
UPDATE campaignd.campaigns
SET stuck_since = NULL, stuck_reason = NULL
WHERE stuck_since IS NOT NULL
  AND (status <> 'sending' OR updated_at >= now() - make_interval(secs => $1))
RETURNING id;

-- name: wd_gauges
-- Per sender: SENDING campaigns, recipients not yet final, and stuck campaigns.
SELECT sender_id,
       count(*) AS active,
       coalesce(sum(greatest(total_count - sent_count - failed_count - skipped_count, 0)), 0) AS open,
       count(*) FILTER (WHERE stuck_since IS NOT NULL) AS stuck
FROM campaignd.campaigns
WHERE status = 'sending'
GROUP BY sender_id;
