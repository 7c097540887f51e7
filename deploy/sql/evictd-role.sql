-- A least-privilege login role for the evictd daemon (`evictd run`, `doctor`, `stats`).
-- Run as the owner of schema evictd, after `evictd migrate` (which itself needs an owner of the
-- configured tables). Then set a password:  ALTER ROLE evictd_daemon PASSWORD '...';
--
-- The daemon reads what is installed, LISTENs, claims and deletes outbox rows, and moves
-- poison events aside. It needs nothing on the application's tables: the triggers run as their
-- owner (SECURITY DEFINER).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'evictd_daemon') THEN
        CREATE ROLE evictd_daemon LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
END
$$;

ALTER ROLE evictd_daemon SET lock_timeout = '5s';
ALTER ROLE evictd_daemon SET idle_in_transaction_session_timeout = '60s';

GRANT USAGE ON SCHEMA evictd TO evictd_daemon;
GRANT SELECT ON evictd.settings TO evictd_daemon;
-- SELECT ... FOR UPDATE SKIP LOCKED needs UPDATE; acknowledging needs DELETE.
GRANT SELECT, UPDATE, DELETE ON evictd.outbox TO evictd_daemon;
GRANT SELECT, INSERT ON evictd.dead_letter TO evictd_daemon;
-- `notify` and `logical` delivery: the key that signs events sent through channels any role can
-- write to (NOTIFY, logical decoding messages); the daemon checks every event against it.
GRANT SELECT ON evictd.signing_key TO evictd_daemon;
-- The doorbell (outbox delivery, doorbell wake-up, the default): setval tells writers the daemon is draining.
GRANT SELECT, UPDATE ON SEQUENCE evictd.doorbell TO evictd_daemon;

-- `delivery = "logical"` streams from a replication slot, which takes the REPLICATION attribute
-- (and a pg_hba.conf line for replication connections, on a self-hosted server):
-- ALTER ROLE evictd_daemon REPLICATION;
