-- princeps-db audit: ciphertext format (read from the stored bytes)
--
-- WHAT IT CHECKS
--   Every non-NULL "accessTokenEncrypted" and "refreshTokenEncrypted" value is
--   parsed as an OpenPGP message, as pgcrypto writes it (bytea, no armor):
--     byte 0             0xC3 (195): symmetric-key session packet
--     byte 1             length of that packet
--     byte 2             4: packet version
--     byte 3             9: AES-256 (7 AES-128, 8 AES-192, 4 Blowfish, 3 CAST5, 2 3DES)
--     byte 4             S2K mode: 1 (salted) or 3 (salted, iterated); 0 is unsalted
--     byte 2 + byte 1    0xD2 (210): data packet with MDC integrity check
--                        (0xC9 = 201: no integrity check)
--   Anything else is FAIL, with the row ids. The check needs no key, so an
--   auditor can run it on a dump restored anywhere. A second row says whether
--   the database itself enforces this format: a validated CHECK constraint
--   on each column that reads its bytes, as the contract migration adds.
--
-- HOW TO RUN
--   psql "$DATABASE_URL" -f sql/audit/ciphertext_format.sql   (or all.sql). Read-only.
--
-- HOW TO READ
--   PASS: every stored value is an AES-256, MDC-protected pgcrypto message.
--   FAIL "not a pgcrypto message": the column holds something else, perhaps the
--   token itself; treat those tokens as exposed. FAIL on cipher, S2K or MDC: the
--   value was written by something other than princeps-db; rewrite it.
WITH messages AS (
    SELECT t.id, 'accessTokenEncrypted' AS col, t."accessTokenEncrypted" AS m
    FROM (SELECT NULL::bytea AS "accessTokenEncrypted") AS absent,
         LATERAL (SELECT id, "accessTokenEncrypted" FROM "Integration") AS t
    WHERE t."accessTokenEncrypted" IS NOT NULL
    UNION ALL
    SELECT t.id, 'refreshTokenEncrypted', t."refreshTokenEncrypted"
    FROM (SELECT NULL::bytea AS "refreshTokenEncrypted") AS absent,
         LATERAL (SELECT id, "refreshTokenEncrypted" FROM "Integration") AS t
    WHERE t."refreshTokenEncrypted" IS NOT NULL
),
verdicts AS (
    -- CASE evaluates in order, so no get_byte reads past the end of a short value.
    SELECT id, col,
        CASE
            WHEN length(m) < 16 OR get_byte(m, 0) <> 195
                THEN 'not a pgcrypto symmetric message'
            WHEN get_byte(m, 1) >= 192 OR length(m) <= 2 + get_byte(m, 1)
                THEN 'malformed session packet'
            WHEN get_byte(m, 2) <> 4
                THEN concat('session packet version ', get_byte(m, 2), ', not 4')
            WHEN get_byte(m, 3) <> 9
                THEN concat('cipher ', CASE get_byte(m, 3)
                    WHEN 7 THEN 'AES-128' WHEN 8 THEN 'AES-192' WHEN 4 THEN 'Blowfish (bf)'
                    WHEN 3 THEN 'CAST5' WHEN 2 THEN '3DES'
                    ELSE concat('number ', get_byte(m, 3)) END, ', not AES-256')
            WHEN get_byte(m, 4) NOT IN (1, 3)
                THEN concat('S2K mode ', get_byte(m, 4),
                    CASE WHEN get_byte(m, 4) = 0 THEN ' (unsalted)' ELSE '' END, ', not 1 or 3')
            WHEN get_byte(m, 2 + get_byte(m, 1)) = 201
                THEN 'no MDC integrity check'
            WHEN get_byte(m, 2 + get_byte(m, 1)) <> 210
                THEN 'unknown data packet'
        END AS problem
    FROM messages
),
failures AS (
    SELECT col, problem, count(*) AS n,
           array_to_string((array_agg(id ORDER BY id))[1:5], ', ') AS sample_ids
    FROM verdicts
    WHERE problem IS NOT NULL
    GROUP BY col, problem
),
guarded AS (
    -- A validated CHECK constraint on the column alone that reads its bytes.
    SELECT a.attname AS col,
           string_agg(quote_ident(c.conname), ', ' ORDER BY c.conname) AS names
    FROM pg_catalog.pg_attribute AS a
    JOIN pg_catalog.pg_constraint AS c
      ON c.conrelid = a.attrelid AND c.contype = 'c' AND c.convalidated
     AND c.conkey = ARRAY[a.attnum]
     AND pg_catalog.pg_get_constraintdef(c.oid) LIKE '%get_byte%'
    WHERE a.attrelid = '"Integration"'::regclass
      AND a.attname IN ('accessTokenEncrypted', 'refreshTokenEncrypted')
      AND NOT a.attisdropped
    GROUP BY a.attname
),
constraints AS (
    SELECT count(*) AS guarded_columns,
           string_agg(names, ', ' ORDER BY col) AS names
    FROM guarded
)
SELECT 'FAIL' AS status, 'ciphertext format' AS "check",
       concat(n, ' ', quote_ident(col), ' value(s): ', problem, ' (ids: ', sample_ids,
              CASE WHEN n > 5 THEN ', ...' ELSE '' END, ')') AS subject,
       CASE
           WHEN problem = 'not a pgcrypto symmetric message'
               THEN 'treat these tokens as exposed: revoke them at Google, then DELETE the rows '
                    || '(the users reconnect)'
           WHEN problem LIKE 'cipher Blowfish%' OR problem LIKE 'cipher CAST5%'
               THEN 'on servers before 15.19 (CVE-2026-14663) this may be readable: revoke the '
                    || 'tokens, upgrade PostgreSQL, rewrite the rows via upsert_integration'
           ELSE 'rewrite these tokens through princeps-db (upsert_integration) or DELETE the rows'
       END AS remedy
FROM failures
UNION ALL
SELECT 'PASS', 'ciphertext format',
       CASE WHEN count(*) = 0 THEN 'no stored ciphertext to check'
            ELSE concat(count(*) FILTER (WHERE col = 'accessTokenEncrypted'),
                        ' access and ', count(*) FILTER (WHERE col = 'refreshTokenEncrypted'),
                        ' refresh token(s) are AES-256 pgcrypto messages with MDC') END,
       'nothing to do'
FROM verdicts
WHERE problem IS NULL
HAVING count(*) > 0 OR NOT EXISTS (SELECT FROM failures)
UNION ALL
SELECT CASE WHEN guarded_columns = 2 THEN 'PASS' ELSE 'WARN' END, 'ciphertext format',
       CASE WHEN guarded_columns = 2
           THEN concat('the database refuses any other value: CHECK ', names)
           WHEN guarded_columns = 0 THEN 'no CHECK constraint guards the ciphertext format'
           ELSE concat('only one column is guarded: CHECK ', names) END,
       CASE WHEN guarded_columns = 2 THEN 'nothing to do'
           ELSE 'run `alembic upgrade head` (the contract migration adds both constraints)' END
FROM constraints;
