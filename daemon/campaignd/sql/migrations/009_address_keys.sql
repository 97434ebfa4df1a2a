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
