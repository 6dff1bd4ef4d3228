-- princeps-db audit: coverage (which integration tokens are encrypted)
--
-- WHAT IT CHECKS
--   Classifies every row of "Integration" by the state of its tokens and counts
--   the rows per provider and per "tokenKeyId" (the id of the master key the
--   row needs; `princeps-db keygen` prints a key's id):
--     encrypted                    ciphertext, no plaintext left          PASS
--     plaintext                    plaintext token(s), no ciphertext       FAIL
--     plaintext beside ciphertext  encrypted, plaintext still readable     FAIL
--     missing                      no access token at all                  FAIL
--     encrypted, no key id         ciphertext without "tokenKeyId"         FAIL
--   A last row says whether the plaintext columns "accessToken" and
--   "refreshToken" still exist. The query runs at every migration stage: a
--   column that does not exist (yet, or any more) reads as NULL, because the
--   LATERAL subquery resolves a missing column to the NULL placeholder of the
--   same name in "absent".
--
-- HOW TO RUN
--   psql "$DATABASE_URL" -f sql/audit/coverage.sql
--   (sql/audit/all.sql runs it together with every other check). Read-only.
--   The role needs SELECT on "Integration": it reads ciphertext, never keys.
--
-- HOW TO READ
--   One row per (provider, key id, state); the subject gives the row count and
--   up to 5 row ids. Any FAIL means some token is readable without a key, or
--   unusable. Every key id listed must still be configured
--   (INTEGRATION_TOKEN_ENCRYPTION_KEY or INTEGRATION_TOKEN_PREVIOUS_KEYS) or
--   those rows can no longer be decrypted.
WITH token_rows AS (
    SELECT
        t.id,
        t.provider,
        t."tokenKeyId" AS key_id,
        (t."accessToken" IS NOT NULL OR t."refreshToken" IS NOT NULL) AS has_plaintext,
        t."accessTokenEncrypted" IS NOT NULL AS has_ciphertext
    FROM
        (SELECT NULL::text AS "accessToken", NULL::text AS "refreshToken",
                NULL::bytea AS "accessTokenEncrypted", NULL::text AS "tokenKeyId") AS absent,
        LATERAL (
            SELECT id, provider, "tokenKeyId", "accessToken", "refreshToken",
                   "accessTokenEncrypted"
            FROM "Integration"
        ) AS t
),
classified AS (
    SELECT
        id, provider, key_id,
        CASE
            WHEN has_plaintext AND NOT has_ciphertext THEN 'plaintext'
            WHEN has_plaintext THEN 'plaintext beside ciphertext'
            WHEN NOT has_ciphertext THEN 'missing'
            WHEN key_id IS NULL THEN 'encrypted, no key id'
            ELSE 'encrypted'
        END AS state
    FROM token_rows
),
per_group AS (
    SELECT
        provider, key_id, state, count(*) AS n,
        array_to_string((array_agg(id ORDER BY id))[1:5], ', ') AS sample_ids
    FROM classified
    GROUP BY provider, key_id, state
),
plaintext_columns AS (
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attname) AS names
    FROM pg_catalog.pg_attribute
    WHERE attrelid = '"Integration"'::regclass
      AND attname IN ('accessToken', 'refreshToken')
      AND NOT attisdropped
),
results AS (
    SELECT
        CASE WHEN state = 'encrypted' THEN 'PASS' ELSE 'FAIL' END AS status,
        'coverage' AS "check",
        concat(n, ' row(s) ', state, ': provider ', provider, ', key id ',
               coalesce(key_id, '(none)'),
               CASE WHEN state = 'encrypted' THEN '' ELSE concat(' (ids: ', sample_ids,
                    CASE WHEN n > 5 THEN ', ...' ELSE '' END, ')') END) AS subject,
        CASE state
            WHEN 'encrypted' THEN 'nothing to do; keep this key id configured while rows use it'
            WHEN 'plaintext' THEN
                'tokens readable by anyone who can read the table or a dump: run '
                || '`alembic upgrade head` (backfill encrypts, contract drops the plaintext)'
            WHEN 'plaintext beside ciphertext' THEN
                'plaintext still readable: finish with `alembic upgrade head`, then '
                || 'VACUUM FULL "Integration" and expire backups taken before it'
            WHEN 'missing' THEN
                'row has no token: DELETE it (the user reconnects the integration)'
            ELSE 'find the key these rows decrypt with and set "tokenKeyId" to its id'
        END AS remedy,
        provider AS sort_provider, state AS sort_state
    FROM per_group
    UNION ALL
    SELECT 'PASS', 'coverage', 'no integrations stored', 'nothing to do', '', ''
    WHERE NOT EXISTS (SELECT FROM token_rows)
    UNION ALL
    SELECT
        CASE WHEN names IS NULL THEN 'PASS' ELSE 'WARN' END,
        'coverage',
        CASE WHEN names IS NULL
            THEN 'plaintext columns "accessToken" and "refreshToken" are gone'
            ELSE concat('plaintext column(s) still exist: ', names) END,
        CASE WHEN names IS NULL
            THEN 'nothing to do (after the contract migration, VACUUM FULL "Integration" once)'
            ELSE 'legacy code can still write plaintext: finish with `alembic upgrade head`' END,
        '~', ''
    FROM plaintext_columns
)
SELECT status, "check", subject, remedy
FROM results
ORDER BY CASE status WHEN 'FAIL' THEN 0 WHEN 'WARN' THEN 1 ELSE 2 END,
         sort_provider, sort_state, subject;
