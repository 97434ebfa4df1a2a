-- campaignd schema, version 2: what the watchdog needs to act on lanes no daemon serves.

-- The in-doubt policy of a sender, mirrored from config, so that any daemon's watchdog can
-- recover a dead lane's claims the way that sender's own config asks.
ALTER TABLE campaignd.senders
    ADD COLUMN resend_in_doubt boolean NOT NULL DEFAULT true;

-- Set by the watchdog while a SENDING campaign makes no progress, with the reason it found;
-- cleared when it moves again.
ALTER TABLE campaignd.campaigns
    ADD COLUMN stuck_since timestamptz,
    ADD COLUMN stuck_reason text;
