-- The server's own role, least privilege: `sira migrate` runs as the schema owner;
-- `sira-server` connects as sira_app, which can read and write rows but owns
-- nothing, so it can change no table, disable no trigger, and only append to
-- the audit log. Roles belong to the cluster: several databases (and concurrent
-- runs) may get here, so creating it is idempotent and race-safe.
--
-- LOGIN without a password: over password authentication nobody can log in as
-- sira_app until an operator sets one (ALTER ROLE sira_app PASSWORD '...').
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sira_app') THEN
        BEGIN
            CREATE ROLE sira_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                NOREPLICATION NOBYPASSRLS;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- a concurrent run made it first
        END;
    END IF;
END
$$;

-- No table creation in public for anyone but its owner (the default from
-- PostgreSQL 15 on; older servers let every role create tables there).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO sira_app;

-- Rows of every table so far (this covers 0001 and 0002) ...
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO sira_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO sira_app;
-- ... except the append-only audit log and the migration ledger.
REVOKE UPDATE, DELETE ON experiment_audit_logs FROM sira_app;
REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM sira_app;

-- Tables later migrations create get the same row rights; a later append-only
-- table must REVOKE UPDATE, DELETE itself, as above.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO sira_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO sira_app;
