-- campaignd schema, version 9: duplicate addresses are found by what the provider sends to.

-- A phone number reaches WhatsApp and Twilio as its digits, however it was written: "+1 (555)
-- 000-1111", "+15550001111" and "15550001111" are one person, who was sent one message each.
-- For providers of phone numbers, an address shaped as the send path accepts one (at most 64
-- characters: blanks around it, one leading +, digits and the separators people write:
-- spaces, non-breaking spaces, . ( ) / -) is keyed by its digits, the rest by the address
-- without its spaces.
-- Anything else keeps its exact key, so an address the send path would refuse never shares a
-- key with one it accepts: a duplicate may be missed, a recipient is never skipped for one
-- that cannot be sent. A SQL function of one expression: the planner inlines it.
--
-- A database whose encoding has no non-breaking space (SQL_ASCII, EUC_JP, ...) cannot even
-- parse its escape (\u00a0 and chr(160) fail alike), and could never upgrade past 8. There
-- the same function is created without it: a number written with non-breaking spaces keeps
-- its exact key there, a duplicate missed, never two people merged. Every other database gets
-- the function as it always was (a database already at 9 is not migrated again). A DO block
-- because PL/pgSQL plans a statement only when its branch runs.
DO $migration$
BEGIN
    BEGIN
CREATE FUNCTION campaignd.address_key(address text, phone boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN phone AND char_length(address) <= 64
             AND address ~ '^[[:space:]]*\+?[0-9 \u00a0.()/-]*[[:space:]]*$'
        -- E'' strings know no \v: the vertical tab is \013.
        THEN translate(address, E'+ \t\n\r\f\013\u00a0.()/-', '')
        ELSE btrim(address)
    END
$$;
        -- The body is parsed at creation only while check_function_bodies is on: one call
        -- parses it here either way, so that an escape the encoding lacks fails now. Not a
        -- phone: the call needs the parse, not the regex (which a session with
        -- standard_conforming_strings off would misread).
        PERFORM campaignd.address_key('', false);
    EXCEPTION
        -- 0A000: no conversion from UTF-8 at all (SQL_ASCII); 22P05: a conversion, but no
        -- such character in the encoding (EUC_JP, ...).
        WHEN feature_not_supported OR untranslatable_character THEN
CREATE FUNCTION campaignd.address_key(address text, phone boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN phone AND char_length(address) <= 64
             AND address ~ '^[[:space:]]*\+?[0-9 .()/-]*[[:space:]]*$'
        -- E'' strings know no \v: the vertical tab is \013. No non-breaking space: this
        -- database's encoding has none (migration 009).
        THEN translate(address, E'+ \t\n\r\f\013.()/-', '')
        ELSE btrim(address)
    END
$$;
    END;
END
$migration$;
