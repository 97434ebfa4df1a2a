-- The demo stack's campaign: 3,000 recipients for sender "demo", started at once.
--
-- docker-compose.yml runs it with psql (postgres image) after `campaignd migrate`, which
-- created the schema and registered sender "demo" from docker/campaignd.toml. Every run
-- creates one more campaign: `docker compose run --rm seed` sends another.
--
-- It does what a host application does (README, "Starting a campaign"): insert the campaign as
-- a draft, its recipients, then set it to 'sending' -- all in one transaction, so the daemon
-- (woken by NOTIFY at commit) sees the complete list or nothing.
--
-- Like a real list, it has mistakes, which campaignd skips with a reason: no address (10),
-- a blank one (11), a duplicate (20 repeats 19), a missing variable (30), an address with
-- spaces (40). docker/fake_provider.py rejects a few numbers and fails a few others once.

DO $seed$
DECLARE
    new_campaign uuid;
    recipients   integer;
BEGIN
    INSERT INTO campaignd.campaigns (name, sender_id, message)
    VALUES (
        'compose demo: spring sale',
        'demo',
        '{"text": "Hi {{first_name}}, your code is {{code}}. Reply STOP to opt out."}'::jsonb
    )
    RETURNING id INTO new_campaign;

    INSERT INTO campaignd.recipients (campaign_id, address, variables)
    SELECT new_campaign,
           CASE i
               WHEN 10 THEN NULL
               WHEN 11 THEN ''
               WHEN 20 THEN '+1555' || lpad('19', 7, '0')
               WHEN 40 THEN '+1 555 bad'
               ELSE '+1555' || lpad(i::text, 7, '0')
           END,
           CASE i
               WHEN 30 THEN jsonb_build_object('first_name', 'NoCode')
               ELSE jsonb_build_object('first_name', 'Customer' || i, 'code', 1000 + (i * 7919) % 9000)
           END
    FROM generate_series(0, 2999) AS i
    ORDER BY i;
    GET DIAGNOSTICS recipients = ROW_COUNT;

    UPDATE campaignd.campaigns SET status = 'sending' WHERE id = new_campaign;

    RAISE NOTICE 'campaign % (% recipients, sender demo) is sending; follow it with: docker compose exec campaignd campaignd status %',
        new_campaign, recipients, new_campaign;
END
$seed$;
