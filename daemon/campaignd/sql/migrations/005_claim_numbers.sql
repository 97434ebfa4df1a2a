-- campaignd schema, version 5: an outcome applies only to the claim it was decided for.

-- Which of its lane's claims holds this row while it is in flight: the lane numbers its
-- claims. An outcome write whose reply was lost is written again, and a retry or a claim
-- given back (due at once) may have been claimed again by the same lane meanwhile: without
-- the number, the old outcome would land on the new claim, and the recipient be sent twice.
-- NULL whenever the row is not in flight. No default, so adding it rewrites nothing.
ALTER TABLE campaignd.recipients
    ADD COLUMN lease_claim bigint;
