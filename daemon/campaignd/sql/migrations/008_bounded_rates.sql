-- campaignd schema, version 8: a campaign's rate is a number the daemon can size a cap for.

-- 'NaN' and 'Infinity' passed CHECK (rate_per_second > 0): PostgreSQL orders NaN above every
-- number. So did rates near a double's limit (1e308), whose claim room overflows. No lane
-- could serve such a campaign, nor any other campaign of its sender. The bound is a sender's
-- own (config: rate_per_second <= 1,000,000), above which a campaign's cap means nothing.
-- Rows already out of bounds had never been sent at that rate; they take the sender's, which
-- is what a campaign without its own rate gets. NaN is above the bound too.
UPDATE campaignd.campaigns
SET rate_per_second = NULL, updated_at = now()
WHERE rate_per_second > 1000000;

ALTER TABLE campaignd.campaigns
    ADD CONSTRAINT campaigns_rate_per_second_bounded
    CHECK (rate_per_second IS NULL OR rate_per_second <= 1000000);
