-- campaignd schema, version 7: every change of a campaign's status, and every pause and
-- resume of a sender, is counted, so that a daemon's pause applies only to what it saw.

-- A pause whose reply was lost is written again after a backoff; if an operator (or the host,
-- by its own UPDATE) resumed the campaign in between, the retry found it 'sending' and paused
-- it again with the provider's old verdict. Counted by a trigger, so that every writer's
-- changes count, whoever makes them and however.
ALTER TABLE campaignd.campaigns ADD COLUMN status_changes bigint NOT NULL DEFAULT 0;

CREATE FUNCTION campaignd.count_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.status_changes := OLD.status_changes + 1;
    RETURN NEW;
END;
$$;

CREATE TRIGGER campaigns_count_status_changes
    BEFORE UPDATE OF status ON campaignd.campaigns
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION campaignd.count_status_change();

-- The same for a sender's pause (paused_reason set or cleared): a provider's rejection of the
-- sender, written again after a lost reply, must not undo a resume-sender in between.
ALTER TABLE campaignd.senders ADD COLUMN pause_changes bigint NOT NULL DEFAULT 0;

CREATE FUNCTION campaignd.count_pause_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.pause_changes := OLD.pause_changes + 1;
    RETURN NEW;
END;
$$;

CREATE TRIGGER senders_count_pause_changes
    BEFORE UPDATE OF paused_reason ON campaignd.senders
    FOR EACH ROW WHEN ((OLD.paused_reason IS NULL) IS DISTINCT FROM (NEW.paused_reason IS NULL))
    EXECUTE FUNCTION campaignd.count_pause_change();
