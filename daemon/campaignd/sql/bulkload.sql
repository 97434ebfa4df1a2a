-- Bulk campaign creation (campaignd campaign create). Everything runs in one transaction:
-- the campaign row, the recipients (binary COPY through asyncpg's copy_records_to_table,
-- which writes its own COPY statement from the table and column names) and the start.
-- The trigger's NOTIFY is only delivered at commit, so a daemon never sees a campaign
-- whose recipients are still being loaded.

-- name: bulk_session
-- For this transaction only. statement_timeout: the COPY is one statement that lasts as long
-- as the file takes to read; the session's timeout guards the daemon's short statements.
-- plan_cache_mode: campaignd's sessions force custom plans (see db.session_settings), which
-- makes PostgreSQL plan the foreign-key check of campaign_id again for every row COPY
-- inserts: measured 40 instead of 13 us of server CPU per row, 3x the whole load.
SELECT set_config('statement_timeout', '0', true), set_config('plan_cache_mode', 'auto', true);

-- name: bulk_sender
-- $1 sender id
SELECT id, paused_reason FROM campaignd.senders WHERE id = $1;

-- name: bulk_insert_campaign
-- Created as a draft; bulk_start_campaign moves it to sending in the same transaction.
-- $1 name, $2 sender id, $3 message, $4 campaign rate cap (NULL: the sender's rate)
INSERT INTO campaignd.campaigns (name, sender_id, message, rate_per_second)
VALUES ($1, $2, $3, $4)
RETURNING id;

-- name: bulk_start_campaign
-- As a host starts a campaign: the status change fires campaigns_notify_work. $1 campaign id
UPDATE campaignd.campaigns
SET status = 'sending', updated_at = now()
WHERE id = $1 AND status = 'draft'
RETURNING status;
