-- Bulk campaign creation (campaignd campaign create). Everything runs in one transaction:
-- the campaign row, the recipients (binary COPY through asyncpg's copy_records_to_table,
-- which writes its own COPY statement from the table and column names) and the start.
-- The trigger's NOTIFY is only delivered at commit, so a daemon never sees a campaign
-- whose recipients are still being loaded.

-- name: bulk_no_statement_timeout
-- The COPY is one statement that lasts as long as the file takes to read; the session's
-- statement_timeout guards the daemon's short statements, not this one.
SET LOCAL statement_timeout = 0;

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
