-- princeps-db audit: every check that needs no secret
--
-- WHAT IT CHECKS
--   coverage.sql           which rows are encrypted, plaintext or missing, per
--                          provider and per key id
--   ciphertext_format.sql  every stored value is an AES-256 pgcrypto message with MDC
--   server_settings.sql    server version, logging settings, role/database
--                          overrides and pg_stat_statements entries that could
--                          hold tokens or keys
--   privileges.sql         roles that can read or change "Integration"
--   Not included: break_glass_decrypt.sql, which needs the master key.
--   `princeps-db audit` runs exactly the files listed below, in this order.
--
-- HOW TO RUN
--   psql "$DATABASE_URL" -X -f sql/audit/all.sql
--   Everything runs in one READ ONLY transaction, rolled back at the end; it
--   works on a hot standby and on a restored dump. The role needs SELECT on
--   "Integration"; pg_read_all_settings and pg_read_all_stats let it see
--   everything. Name the roles expected to have access with
--   PGOPTIONS='-c princeps.audit_allowed_roles=princeps_app,auditor'.
--
-- HOW TO READ
--   Each check prints rows of (status, check, subject, remedy). FAIL: a token
--   or key is, or will be, readable without the master key, or a stored value
--   is not what princeps-db writes. WARN: a weakness to fix or to justify.
--   PASS: nothing to do. docs/auditing.md explains every row.
\set ON_ERROR_STOP on
\set QUIET on
\pset footer off
BEGIN TRANSACTION READ ONLY;

\pset title 'coverage'
\ir coverage.sql
\pset title 'ciphertext format'
\ir ciphertext_format.sql
\pset title 'server settings'
\ir server_settings.sql
\pset title 'privileges'
\ir privileges.sql

ROLLBACK;
\pset title
\set QUIET off
