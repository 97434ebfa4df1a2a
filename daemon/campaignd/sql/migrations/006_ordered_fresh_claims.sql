-- campaignd schema, version 6: a claim reads a campaign's fresh recipients in index order,
-- whatever the planner estimates.

-- Beside older campaigns' rows, campaign_id's physical order looks random to the planner,
-- which then priced reading recipients_fresh in order above sorting every pending recipient
-- of the campaign found through recipients_campaign_state: a sort per claim that grew with
-- what was left to send, and spilled to disk (bench/scale.py beside 1M older rows: 57 ms
-- against 0.7 ms per claim of 1,000, three times PostgreSQL's CPU per message). With sorts
-- disabled for this one lookup, recipients_fresh is the only way to the order asked for.
-- A function, because a setting can be scoped to it (SET clauses) and not to a statement.
CREATE FUNCTION campaignd.lock_fresh_recipients(
    campaign uuid, after_id bigint, below_id bigint, max_rows integer
) RETURNS SETOF bigint
LANGUAGE sql VOLATILE
SET enable_sort = off
SET enable_incremental_sort = off
AS $$
    SELECT r.id
    FROM campaignd.recipients r
    WHERE (r.campaign_id, r.id) > (campaign, after_id)
      AND (r.campaign_id, r.id) < (campaign, below_id)
      AND r.state = 'pending' AND r.next_attempt_at IS NULL
    ORDER BY r.campaign_id, r.id
    LIMIT max_rows
    FOR UPDATE OF r SKIP LOCKED
$$;
