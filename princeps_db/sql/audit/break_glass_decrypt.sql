-- princeps-db: BREAK-GLASS decryption of one integration token
--
-- EXCEPTIONAL. Use it only when the application cannot serve a token and an
-- incident requires the value itself. Every use is recorded: the script writes
-- a LOG line to the server log (who, which integration, the reason), and the
-- operator records the same line, printed on stderr, in the incident log.
--
-- WHAT IT DOES
--   1. Refuses to continue if this session would log the statements it sends
--      (log_statement = all, log_min_duration_statement/_sample >= 0,
--      log_transaction_sample_rate > 0, debug_print_plan, auto_explain,
--      pgaudit read logging): the master key travels inside a statement.
--   2. Reads the master key from the environment variable
--      INTEGRATION_TOKEN_ENCRYPTION_KEY with \getenv: it is never typed, never
--      on a command line, never in shell history.
--   3. Derives the per-row key in SQL exactly as princeps_db.crypto does:
--        raw key     = base64url-decode(INTEGRATION_TOKEN_ENCRYPTION_KEY)
--        key id      = first 16 hex digits of HMAC-SHA256(raw key, 'princeps-db:v1:key-id')
--        row key     = hex(HMAC-SHA256(raw key,
--                          'princeps-db:v1:<access_token|refresh_token>:<provider>:<userId>'))
--      and refuses unless the key id matches the row's "tokenKeyId" (so a
--      wrong key never reaches pgp_sym_decrypt).
--   4. Writes the LOG line, then decrypts with pgp_sym_decrypt(ciphertext, row key)
--      and prints the token alone on stdout.
--
-- HOW TO RUN
--   Put the key in the environment from the secret store, without typing it, e.g.
--     export INTEGRATION_TOKEN_ENCRYPTION_KEY="$(cat /run/secrets/integration_token_key)"
--   then
--     psql "$DATABASE_URL" -X -v user_id=user-123 -v provider=google_calendar \
--          -v reason='INC-4711: calendar sync outage' [-v token=refresh] \
--          -f sql/audit/break_glass_decrypt.sql
--   token is access (default) or refresh. Do not add -a, -e or -L: they would
--   copy the statement carrying the key to the terminal or a file. For a row
--   under an older key, export that key instead (its id must match).
--
-- HOW TO READ
--   stdout: the token, nothing else. stderr: the record line. Exit status 0
--   when the token was printed, 3 when the script refused (the reason is on
--   stderr and, as an ERROR, in the server log). Afterwards: unset the
--   variable, and consider the token exposed (revoke it at Google when the
--   incident is over; the user reconnects).
\set ON_ERROR_STOP on
\set ECHO none
\set ECHO_HIDDEN off
\set QUIET on
\pset footer off
SET application_name = 'princeps-db break-glass';

\if :{?user_id}
\else
\warn 'break-glass refused: pass -v user_id=<userId of the integration>'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no user_id given'; END$$;
\endif
\if :{?provider}
\else
\warn 'break-glass refused: pass -v provider=google_calendar|google_drive'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no provider given'; END$$;
\endif
\if :{?reason}
\else
\warn 'break-glass refused: pass -v reason=''<incident id and why>'''
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no reason given'; END$$;
\endif
\if :{?token}
\else
\set token access
\endif

-- 1. Would this session log the statement that carries the key?
SELECT
    CASE lower(:'token') WHEN 'access' THEN 'access_token'
                         WHEN 'refresh' THEN 'refresh_token' END AS bg_kind,
    concat_ws(', ',
        CASE WHEN current_setting('log_statement') = 'all' THEN 'log_statement = all' END,
        CASE WHEN current_setting('log_min_duration_statement') !~ '^-'
             THEN 'log_min_duration_statement >= 0' END,
        CASE WHEN current_setting('log_min_duration_sample') !~ '^-'
             THEN 'log_min_duration_sample >= 0' END,
        CASE WHEN current_setting('log_transaction_sample_rate') !~ '^0*\.?0*$'
             THEN 'log_transaction_sample_rate > 0' END,
        CASE WHEN current_setting('debug_print_plan') = 'on' THEN 'debug_print_plan = on' END,
        CASE WHEN coalesce(current_setting('auto_explain.log_min_duration', true), '-1') !~ '^-'
             THEN 'auto_explain.log_min_duration >= 0' END,
        CASE WHEN coalesce(current_setting('pgaudit.log', true), 'none') ~* '(all|read)'
             THEN 'pgaudit.log includes read' END) AS bg_logging
\gset
\if :{?bg_kind}
\else
\warn 'break-glass refused: token must be access or refresh'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: unknown token kind'; END$$;
\endif
SELECT :'bg_logging' <> '' AS bg_unsafe
\gset
\if :bg_unsafe
\warn 'break-glass refused: this session logs statements (':bg_logging'); as a superuser, start psql with PGOPTIONS=''-c log_statement=none -c log_min_duration_statement=-1 ...'' or fix the server first'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: the session logs statements'; END$$;
\endif

-- 2. The master key, from the environment only.
\getenv bg_master_key INTEGRATION_TOKEN_ENCRYPTION_KEY
\if :{?bg_master_key}
\else
\warn 'break-glass refused: INTEGRATION_TOKEN_ENCRYPTION_KEY is not set in the environment'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no key in the environment'; END$$;
\endif

-- 3. Derive the key id and the row key in SQL; nothing here can fail, so no
-- error report can copy this statement into the server log.
SELECT
    k.key_id AS bg_key_id,
    k.raw IS NOT NULL AS bg_key_valid,
    i.id AS bg_id,
    i."tokenKeyId" AS bg_row_key_id,
    coalesce(i."tokenKeyId" = k.key_id, false) AS bg_key_matches,
    CASE :'bg_kind' WHEN 'access_token' THEN i."accessTokenEncrypted"
                    ELSE i."refreshTokenEncrypted" END IS NOT NULL AS bg_has_token,
    encode(hmac(convert_to(concat('princeps-db:v1:', :'bg_kind', ':', i.provider, ':',
                                  i."userId"), 'UTF8'),
                k.raw, 'sha256'), 'hex') AS bg_row_key
FROM (
    SELECT CASE WHEN m ~ '^[A-Za-z0-9_-]{43,}$' AND length(m) % 4 <> 1
                THEN decode(translate(m, '-_', '+/') || repeat('=', (4 - length(m) % 4) % 4),
                            'base64') END AS raw
    FROM (SELECT btrim(:'bg_master_key') AS m) AS typed
) AS r
CROSS JOIN LATERAL (
    SELECT r.raw,
           left(encode(hmac(convert_to('princeps-db:v1:key-id', 'UTF8'), r.raw, 'sha256'), 'hex'),
                16) AS key_id
) AS k
LEFT JOIN "Integration" AS i ON i."userId" = :'user_id' AND i.provider = :'provider'
\gset
\unset bg_master_key

\if :bg_key_valid
\else
\warn 'break-glass refused: INTEGRATION_TOKEN_ENCRYPTION_KEY is not a base64url key of at least 32 bytes'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: malformed key'; END$$;
\endif
\if :{?bg_id}
\else
\warn 'break-glass refused: no integration for this user_id and provider'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no such integration'; END$$;
\endif
\if :bg_key_matches
\else
\warn 'break-glass refused: the row needs key id ':bg_row_key_id', the key in the environment has id ':bg_key_id
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: key id mismatch'; END$$;
\endif
\if :bg_has_token
\else
\warn 'break-glass refused: this integration stores no ':token' token'
DO $$BEGIN RAISE EXCEPTION 'princeps-db break-glass refused: no such token stored'; END$$;
\endif

-- 4. Record, then decrypt.
SELECT concat('princeps-db break-glass: ', :'bg_kind', ' of integration ', :'bg_id',
              ' (user ', :'user_id', ', provider ', :'provider', ') decrypted by role ',
              session_user, ' from ', coalesce(host(inet_client_addr()), 'a local socket'),
              ' at ', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
              '; reason: ', :'reason') AS bg_record
\gset
SELECT format('DO $bg$BEGIN RAISE LOG %L; END$bg$', :'bg_record')
\gexec
\warn '================================================================'
\warn 'BREAK-GLASS: record this line in the incident log'
\warn :bg_record
\warn '================================================================'
\pset format unaligned
\pset tuples_only on
SELECT pgp_sym_decrypt(
           CASE :'bg_kind' WHEN 'access_token' THEN "accessTokenEncrypted"
                           ELSE "refreshTokenEncrypted" END,
           :'bg_row_key')
FROM "Integration"
WHERE id = :'bg_id';
\unset bg_row_key
