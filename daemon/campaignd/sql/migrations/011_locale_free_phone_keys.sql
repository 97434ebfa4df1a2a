-- campaignd schema, version 11: a phone number's key no longer depends on the locale.

-- address_key (migration 009) let a phone number have blanks around it as [[:space:]], whose
-- meaning is the database's locale's: with the builtin or ICU providers a non-breaking space
-- is one, with glibc's it is not, and the em space and its kin are one with glibc's too. The
-- send path (providers/addresses.py) strips ASCII blanks only, so on some databases a number
-- the send path refuses ("\u00a0+15550001111") shared its key with the same number written
-- plainly, and, written first, had it skipped as its duplicate: that person was sent nothing.
-- The blanks are now spelled out (regular-expression escapes, read by PostgreSQL's regex
-- engine whatever the locale), the same ASCII blanks translate() removes. And the 64
-- characters are counted without the blanks around the number, as the send path counts them:
-- a number padded past 64 had a key of its own, and was sent once for each spelling.
-- Otherwise as 009, the fallback for encodings without the non-breaking space included.
DO $migration$
BEGIN
    BEGIN
CREATE OR REPLACE FUNCTION campaignd.address_key(address text, phone boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN phone AND char_length(btrim(address, E' \t\n\r\f\013')) <= 64
             AND address ~ '^[ \t\n\r\f\v]*\+?[0-9 \u00a0.()/-]*[ \t\n\r\f\v]*$'
        -- E'' strings know no \v: the vertical tab is \013.
        THEN translate(address, E'+ \t\n\r\f\013\u00a0.()/-', '')
        ELSE btrim(address)
    END
$$;
        -- See migration 009: one call parses the body, so an escape the encoding lacks fails
        -- here, inside this block.
        PERFORM campaignd.address_key('', false);
    EXCEPTION
        WHEN feature_not_supported OR untranslatable_character THEN
CREATE OR REPLACE FUNCTION campaignd.address_key(address text, phone boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN phone AND char_length(btrim(address, E' \t\n\r\f\013')) <= 64
             AND address ~ '^[ \t\n\r\f\v]*\+?[0-9 .()/-]*[ \t\n\r\f\v]*$'
        -- E'' strings know no \v: the vertical tab is \013. No non-breaking space: this
        -- database's encoding has none (migration 009).
        THEN translate(address, E'+ \t\n\r\f\013.()/-', '')
        ELSE btrim(address)
    END
$$;
    END;
END
$migration$;
