-- princeps-db audit: server settings that could write tokens or keys elsewhere
--
-- WHAT IT CHECKS
--   Tokens (on writes) and per-row derived keys (on every read and write) reach
--   the server as bind parameters. Nothing stores them, unless the server is
--   told to log or keep statements with their parameters:
--     server version              below 15.19: WARN (CVE-2026-14663: bf/cast5 may
--                                 silently store tokens readable under OpenSSL 3)
--     log_statement               mod/all log writes/everything with parameters: FAIL
--     log_min_duration_statement  0 logs every statement: FAIL; > 0 slow ones: WARN
--     log_min_duration_sample,    sampled statements or transactions are logged with
--     log_transaction_sample_rate parameters: WARN
--       (the four above are PASS when log_parameter_max_length = 0, which keeps
--        bind parameters out of statement logging)
--     log_parameter_max_length    reported; 0 is the value to demand
--     log_parameter_max_length_on_error
--                                 non-zero logs the parameters of failing statements
--                                 (e.g. a token in an INSERT that fails): FAIL
--     debug_print_plan            on: plans with bound values go to the log: FAIL
--     auto_explain                preloaded with log_min_duration >= 0: WARN; with
--                                 log_verbose or log_parameter_max_length <> 0: FAIL
--     pgaudit.log_parameter       on: FAIL
--     per-role / per-database overrides (pg_db_role_setting) of all the above
--     that apply to this database,
--     and of session_preload_libraries / local_preload_libraries; any override
--     whose name looks like a secret (key, secret, token, password) is FAIL:
--     every role can read pg_db_role_setting. Values of those are never shown.
--     pg_stat_statements          entries whose text holds a pgcrypto call with a
--                                 literal argument (a key or token kept verbatim): FAIL
--   Settings are read as this session sees them (postgresql.conf, ALTER SYSTEM,
--   and any override for the auditing role or database). An override's
--   mitigation by log_parameter_max_length = 0 counts if the same override, or
--   the server-wide configuration, sets it.
--
-- HOW TO RUN
--   psql "$DATABASE_URL" -f sql/audit/server_settings.sql   (or all.sql). Read-only.
--   To see every role's pg_stat_statements entries, the auditing role needs
--   pg_read_all_stats (GRANT pg_read_all_stats TO auditor); otherwise WARN.
--
-- HOW TO READ
--   Each row names the setting and where it is set; the remedy is the exact
--   statement that fixes it (as a superuser; after ALTER SYSTEM, also
--   SELECT pg_reload_conf(); role and database overrides apply to new sessions).
--   Logs written before a fix may already hold tokens: rotate and purge them.
WITH session_values AS (
    SELECT
        current_setting('server_version_num')::int AS version_num,
        current_setting('server_version') AS version,
        current_setting('log_parameter_max_length') = '0' AS params_hidden,
        -- Server-wide only if no role, database or session override set it.
        current_setting('log_parameter_max_length') = '0'
            AND (SELECT source FROM pg_catalog.pg_settings
                 WHERE name = 'log_parameter_max_length')
                NOT IN ('database', 'user', 'database user', 'client', 'session')
            AS server_params_hidden,
        concat_ws(',', current_setting('shared_preload_libraries'),
                  current_setting('session_preload_libraries'),
                  current_setting('local_preload_libraries')) ~ '(^|[\s,"])auto_explain($|[\s,"])'
            AS auto_explain_loaded
),
overrides AS (
    SELECT
        CASE
            WHEN d.setrole <> 0 AND d.setdatabase <> 0
                THEN concat('role ', quote_ident(r.rolname), ' in database ', quote_ident(db.datname))
            WHEN d.setrole <> 0 THEN concat('role ', quote_ident(r.rolname))
            ELSE concat('database ', quote_ident(db.datname))
        END AS scope,
        CASE
            WHEN d.setrole <> 0 AND d.setdatabase <> 0
                THEN concat('ALTER ROLE ', quote_ident(r.rolname), ' IN DATABASE ', quote_ident(db.datname))
            WHEN d.setrole <> 0 THEN concat('ALTER ROLE ', quote_ident(r.rolname))
            ELSE concat('ALTER DATABASE ', quote_ident(db.datname))
        END AS alter_prefix,
        lower(split_part(entry, '=', 1)) AS name,
        substr(entry, strpos(entry, '=') + 1) AS value,
        coalesce(
            (SELECT substr(e2, strpos(e2, '=') + 1) = '0'
             FROM unnest(d.setconfig) AS e2
             WHERE lower(split_part(e2, '=', 1)) = 'log_parameter_max_length'),
            (SELECT server_params_hidden FROM session_values)) AS params_hidden
    FROM pg_catalog.pg_db_role_setting AS d
    LEFT JOIN pg_catalog.pg_roles AS r ON r.oid = d.setrole
    LEFT JOIN pg_catalog.pg_database AS db ON db.oid = d.setdatabase
    CROSS JOIN LATERAL unnest(d.setconfig) AS entry
    -- Overrides for other databases never apply to sessions on this one.
    WHERE d.setdatabase = 0
       OR d.setdatabase = (SELECT oid FROM pg_catalog.pg_database
                           WHERE datname = current_database())
),
settings AS (
    -- (scope, name, value, params_hidden, how to fix)
    SELECT 'server' AS scope, s.name, current_setting(s.name, true) AS value,
           v.params_hidden, 'ALTER SYSTEM' AS alter_prefix, true AS is_server,
           (SELECT ps.source FROM pg_catalog.pg_settings AS ps WHERE ps.name = s.name) AS source
    FROM session_values AS v,
         unnest(ARRAY['log_statement', 'log_min_duration_statement', 'log_min_duration_sample',
                      'log_transaction_sample_rate', 'log_parameter_max_length',
                      'log_parameter_max_length_on_error', 'debug_print_plan',
                      'pgaudit.log_parameter']) AS s(name)
    WHERE current_setting(s.name, true) IS NOT NULL
    UNION ALL
    SELECT scope, name, value, params_hidden, alter_prefix, false, NULL
    FROM overrides
    WHERE name IN ('log_statement', 'log_min_duration_statement', 'log_min_duration_sample',
                   'log_transaction_sample_rate', 'log_parameter_max_length',
                   'log_parameter_max_length_on_error', 'debug_print_plan',
                   'pgaudit.log_parameter', 'session_preload_libraries',
                   'local_preload_libraries')
       OR name LIKE 'auto\_explain.%'
),
judged AS (
    SELECT scope, name, value, is_server, source,
        CASE
            WHEN name = 'log_statement' AND lower(value) IN ('mod', 'all')
                THEN CASE WHEN params_hidden THEN 'PASS' ELSE 'FAIL' END
            WHEN name IN ('log_min_duration_statement', 'log_min_duration_sample')
                 AND value !~ '^\s*-'
                THEN CASE WHEN params_hidden THEN 'PASS'
                          WHEN name = 'log_min_duration_statement' AND value ~ '^\s*0+\s*(ms)?\s*$'
                              THEN 'FAIL'
                          ELSE 'WARN' END
            WHEN name = 'log_transaction_sample_rate' AND value !~ '^\s*0*\.?0*\s*$'
                THEN CASE WHEN params_hidden THEN 'PASS' ELSE 'WARN' END
            WHEN name = 'log_parameter_max_length_on_error' AND value !~ '^\s*0+\s*(B)?\s*$'
                THEN 'FAIL'
            WHEN name IN ('debug_print_plan', 'pgaudit.log_parameter')
                 AND lower(value) IN ('on', 'true', 'yes', '1', 't', 'y')
                THEN 'FAIL'
            WHEN name IN ('session_preload_libraries', 'local_preload_libraries')
                 AND value ~ 'auto_explain'
                THEN 'WARN'
            WHEN name = 'auto_explain.log_min_duration' AND value !~ '^\s*-' THEN 'WARN'
            WHEN name IN ('auto_explain.log_verbose') AND lower(value) IN ('on', 'true', '1')
                THEN 'WARN'
            ELSE 'PASS'
        END AS status,
        alter_prefix,
        params_hidden
    FROM settings
),
setting_rows AS (
    SELECT status,
        CASE WHEN is_server THEN 'server setting' ELSE 'role/database override' END AS "check",
        concat(name, ' = ', quote_literal(value),
               CASE WHEN NOT is_server THEN concat(' for ', scope)
                    WHEN source IS DISTINCT FROM 'default' THEN concat(' (from ', source, ')')
                    ELSE '' END,
               CASE WHEN status = 'PASS' AND params_hidden AND (
                         (name = 'log_statement' AND lower(value) IN ('mod', 'all'))
                         OR (name LIKE 'log\_min\_duration%' AND value !~ '^\s*-')
                         OR (name = 'log_transaction_sample_rate'
                             AND value !~ '^\s*0*\.?0*\s*$'))
                    THEN ' (parameters hidden by log_parameter_max_length = 0)' ELSE '' END)
            AS subject,
        CASE
            WHEN status = 'PASS' AND name = 'log_parameter_max_length' AND value <> '0'
                THEN concat('harmless while statement logging is off; demand ', alter_prefix,
                            ' SET log_parameter_max_length = 0')
            WHEN status = 'PASS' THEN 'nothing to do'
            WHEN name LIKE 'log\_min\_duration%' OR name = 'log_transaction_sample_rate'
                THEN concat(alter_prefix, ' SET log_parameter_max_length = 0 (keeps the ',
                            'statements, drops their parameters)')
            WHEN NOT is_server THEN concat(alter_prefix, ' RESET ', name)
            WHEN name = 'log_statement' THEN 'ALTER SYSTEM SET log_statement = ''ddl'''
            WHEN name = 'log_parameter_max_length_on_error'
                THEN 'ALTER SYSTEM SET log_parameter_max_length_on_error = 0'
            ELSE concat('ALTER SYSTEM SET ', name, ' = off')
        END AS remedy
    FROM judged
),
secret_overrides AS (
    SELECT 'FAIL' AS status, 'role/database override' AS "check",
           concat(name, ' is set for ', scope, ' (value not shown)') AS subject,
           concat('every role can read pg_db_role_setting: ', alter_prefix, ' RESET ', name,
                  ', then rotate that secret') AS remedy
    FROM overrides
    WHERE name ~ '(key|secret|token|passw)'
),
version_row AS (
    SELECT
        CASE WHEN version_num < 150019 THEN 'WARN' ELSE 'PASS' END AS status,
        'server version' AS "check",
        concat('PostgreSQL ', version,
               CASE WHEN version_num < 150019
                    THEN ' is older than 15.19 (CVE-2026-14663: bf/cast5 may store tokens readable)'
                    ELSE '' END) AS subject,
        CASE WHEN version_num < 150019
             THEN 'upgrade to 15.19 or later (Debian security ships 15.20); the CHECK constraints '
                  || 'refuse bf/cast5 values meanwhile'
             WHEN version_num >= 160000
             THEN 'nothing to do if this minor includes the CVE-2026-14663 fix for its major'
             ELSE 'nothing to do' END AS remedy
    FROM session_values
),
auto_explain_row AS (
    SELECT
        CASE
            WHEN NOT auto_explain_loaded
                 OR coalesce(current_setting('auto_explain.log_min_duration', true), '-1') ~ '^\s*-'
                THEN 'PASS'
            WHEN lower(coalesce(current_setting('auto_explain.log_verbose', true), 'off')) = 'on'
                 OR coalesce(current_setting('auto_explain.log_parameter_max_length', true), '0')
                    <> '0'
                THEN 'FAIL'
            ELSE 'WARN'
        END AS status,
        'server setting' AS "check",
        CASE WHEN NOT auto_explain_loaded THEN 'auto_explain is not preloaded'
             ELSE concat('auto_explain preloaded: log_min_duration = ',
                         coalesce(current_setting('auto_explain.log_min_duration', true), '-1'),
                         ', log_verbose = ',
                         coalesce(current_setting('auto_explain.log_verbose', true), 'off'))
        END AS subject,
        CASE
            WHEN NOT auto_explain_loaded THEN 'nothing to do'
            WHEN coalesce(current_setting('auto_explain.log_min_duration', true), '-1') ~ '^\s*-'
                THEN 'nothing to do (plans are not logged)'
            ELSE 'ALTER SYSTEM SET auto_explain.log_min_duration = -1 (or log_verbose = off and, '
                 || 'on 16+, auto_explain.log_parameter_max_length = 0)'
        END AS remedy
    FROM session_values
),
pgss AS (
    SELECT
        n.nspname,
        current_setting('shared_preload_libraries') ~ 'pg_stat_statements' AS loaded,
        (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
            OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') AS sees_all
    FROM pg_catalog.pg_extension AS e
    JOIN pg_catalog.pg_namespace AS n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_stat_statements'
),
pgss_hits AS (
    -- The view exists only when the extension does, so it is queried through
    -- query_to_xml: the text is parsed only on this branch. pg_stat_statements
    -- replaces the constants of ordinary statements by $n; a quote left in an
    -- entry that calls pgcrypto is a literal kept verbatim (utility statements
    -- such as SET, DO, CREATE TABLE AS, or statements it could not normalise).
    -- Only counts and queryids are read back, never the statement text.
    SELECT nspname, loaded, sees_all,
           substring(x FROM '<n>(\d+)</n>')::bigint AS hits,
           substring(x FROM '<ids>([-0-9 ]*)</ids>') AS sample_queryids
    FROM pgss
    LEFT JOIN LATERAL (
        SELECT query_to_xml(
            'SELECT count(*) AS n, array_to_string((array_agg(queryid::text '
            || 'ORDER BY calls DESC))[1:5], '' '') AS ids FROM '
            || quote_ident(nspname) || '.pg_stat_statements '
            || 'WHERE query ~* ''\m(pgp_sym_encrypt|pgp_sym_decrypt|pgp_sym_encrypt_bytea'
            || '|pgp_sym_decrypt_bytea|pgp_pub_encrypt|pgp_pub_decrypt|hmac|encrypt|decrypt'
            || '|encrypt_iv|decrypt_iv)\s*\('' AND position(chr(39) in query) > 0',
            false, false, '')::text AS x
        WHERE loaded
    ) AS found ON true
),
pgss_row AS (
    SELECT
        CASE WHEN NOT EXISTS (SELECT FROM pgss_hits) THEN 'PASS'
             WHEN NOT loaded THEN 'PASS'
             WHEN hits > 0 THEN 'FAIL'
             WHEN NOT sees_all THEN 'WARN'
             ELSE 'PASS' END AS status,
        'pg_stat_statements' AS "check",
        CASE WHEN NOT EXISTS (SELECT FROM pgss_hits)
                 THEN 'extension not installed in this database'
             WHEN NOT loaded THEN 'extension installed but not preloaded (collects nothing)'
             WHEN hits > 0
                 THEN concat(hits, ' entr(ies) call pgcrypto with a literal argument (queryid ',
                             sample_queryids, ')')
             WHEN NOT sees_all
                 THEN 'no entry of this role calls pgcrypto with a literal; other roles'' '
                      || 'entries are hidden from it'
             ELSE 'no entry calls pgcrypto with a literal argument' END AS subject,
        CASE WHEN NOT EXISTS (SELECT FROM pgss_hits) OR NOT loaded OR (hits = 0 AND sees_all)
                 THEN 'nothing to do'
             WHEN hits > 0
                 THEN 'fix the client that sends keys or tokens as SQL text, rotate what it sent, '
                      || 'then SELECT pg_stat_statements_reset()'
             ELSE 'GRANT pg_read_all_stats TO the auditing role and run the audit again' END
            AS remedy
    FROM (SELECT true AS one) AS single
    LEFT JOIN pgss_hits ON true
),
all_rows AS (
    SELECT status, "check", subject, remedy, 0 AS part FROM version_row
    UNION ALL
    SELECT status, "check", subject, remedy,
           CASE WHEN "check" = 'server setting' THEN 1 ELSE 3 END
    FROM setting_rows
    UNION ALL SELECT status, "check", subject, remedy, 2 FROM auto_explain_row
    UNION ALL SELECT status, "check", subject, remedy, 3 FROM secret_overrides
    UNION ALL
    SELECT 'PASS', 'role/database override', 'no role or database overrides a logging setting',
           'nothing to do', 3
    WHERE NOT EXISTS (SELECT FROM setting_rows WHERE "check" = 'role/database override')
      AND NOT EXISTS (SELECT FROM secret_overrides)
    UNION ALL SELECT status, "check", subject, remedy, 4 FROM pgss_row
)
SELECT status, "check", subject, remedy
FROM all_rows
ORDER BY CASE status WHEN 'FAIL' THEN 0 WHEN 'WARN' THEN 1 ELSE 2 END, part, subject;
