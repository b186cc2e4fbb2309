-- The role crm-backup's restores run pg_restore as (RESTORE_DATABASE_URL): no SUPERUSER, so a
-- restored dump cannot run commands on this server (COPY ... FROM PROGRAM). The worker creates
-- each restore's database owned by it. Demo password: change it.
CREATE ROLE crm_restore LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'restore-password';
