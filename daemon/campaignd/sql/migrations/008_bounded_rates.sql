-- campaignd schema, version 8: a campaign's rate is a finite number.

-- 'NaN' and 'Infinity' passed CHECK (rate_per_second > 0): PostgreSQL orders NaN above every
-- number. No lane could serve such a campaign (its cap cannot be sized), nor any other
-- campaign of its sender. Rows already holding one had never been sent at that rate; they
-- take the sender's, which is what a campaign without its own rate gets.
UPDATE campaignd.campaigns
SET rate_per_second = NULL, updated_at = now()
WHERE rate_per_second IN ('NaN'::double precision, 'Infinity'::double precision);

ALTER TABLE campaignd.campaigns
    ADD CONSTRAINT campaigns_rate_per_second_finite
    CHECK (rate_per_second IS NULL OR rate_per_second < 'Infinity'::double precision);
