-- campaignd schema, version 3: daemons announce themselves, so that replicas can share lanes.

-- One row per running daemon, refreshed while it runs and deleted when it stops cleanly.
-- A replica that holds two lanes more than a live peer able to serve them hands one over;
-- an idle peer holds no lease, so this table is the only place it shows up. A row whose
-- expires_at has passed is a daemon that died or lost the database: it is not counted.
CREATE TABLE campaignd.daemons (
    owner        text PRIMARY KEY,
    senders      text[] NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
