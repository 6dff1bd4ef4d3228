-- princeps-db audit: who can read or change "Integration"
--
-- WHAT IT CHECKS
--   Every role (predefined pg_* roles aside) that can SELECT, INSERT, UPDATE,
--   DELETE or TRUNCATE "Integration", directly, through a column grant, through
--   membership in another role (pg_read_all_data included) or as a superuser.
--   The ciphertext alone does not reveal a token, but whoever reads it only
--   needs the master key too, and whoever changes it can destroy or swap tokens.
--   Rules:
--     the owner (it runs the migrations)                         PASS
--       ... if the owner is a superuser                          WARN
--     the bootstrap superuser (the cluster's first role)         PASS
--     any other superuser                                        WARN
--     roles named in princeps.audit_allowed_roles                PASS
--       (comma-separated: the application role, the auditor)
--     any other role with one of those privileges                WARN
--     a grant to PUBLIC (every role, present and future)         FAIL
--
-- HOW TO RUN
--   PGOPTIONS='-c princeps.audit_allowed_roles=princeps_app,auditor' \
--     psql "$DATABASE_URL" -f sql/audit/privileges.sql         (or all.sql)
--   or keep the list in the database:
--     ALTER DATABASE princeps SET princeps.audit_allowed_roles = 'princeps_app,auditor';
--   Read-only.
--
-- HOW TO READ
--   One row per role that has access, with its privileges and how it got them;
--   the remedy is the REVOKE that takes them away (or, for a role that should
--   have them, naming it in princeps.audit_allowed_roles).
WITH target AS (
    SELECT c.oid, c.relowner, c.relacl
    FROM pg_catalog.pg_class AS c
    WHERE c.oid = '"Integration"'::regclass
),
allowed AS (
    SELECT btrim(name) AS rolname
    FROM unnest(string_to_array(
        coalesce(current_setting('princeps.audit_allowed_roles', true), ''), ',')) AS name
    WHERE btrim(name) <> ''
),
direct_grantees AS (
    SELECT (aclexplode(t.relacl)).grantee AS grantee FROM target AS t
    UNION
    SELECT (aclexplode(a.attacl)).grantee
    FROM target AS t
    JOIN pg_catalog.pg_attribute AS a ON a.attrelid = t.oid AND NOT a.attisdropped
    WHERE a.attacl IS NOT NULL
),
public_grants AS (
    SELECT array_agg(DISTINCT privilege_type) AS privileges
    FROM (
        SELECT (aclexplode(t.relacl)).* FROM target AS t
        UNION ALL
        SELECT (aclexplode(a.attacl)).*
        FROM target AS t
        JOIN pg_catalog.pg_attribute AS a ON a.attrelid = t.oid AND NOT a.attisdropped
        WHERE a.attacl IS NOT NULL
    ) AS acl
    WHERE grantee = 0
),
access AS (
    SELECT
        r.oid, r.rolname, r.rolsuper, r.rolcanlogin,
        r.oid = t.relowner AS is_owner,
        r.oid IN (SELECT grantee FROM direct_grantees) AS direct,
        r.rolname IN (SELECT rolname FROM allowed) AS is_allowed,
        array_remove(ARRAY[
            CASE WHEN has_any_column_privilege(r.oid, t.oid, 'SELECT') THEN 'SELECT' END,
            CASE WHEN has_any_column_privilege(r.oid, t.oid, 'INSERT') THEN 'INSERT' END,
            CASE WHEN has_any_column_privilege(r.oid, t.oid, 'UPDATE') THEN 'UPDATE' END,
            CASE WHEN has_table_privilege(r.oid, t.oid, 'DELETE') THEN 'DELETE' END,
            CASE WHEN has_table_privilege(r.oid, t.oid, 'TRUNCATE') THEN 'TRUNCATE' END
        ], NULL) AS privileges,
        array_remove(ARRAY[
            CASE WHEN pg_has_role(r.oid, 'pg_read_all_data', 'USAGE') THEN 'pg_read_all_data' END,
            CASE WHEN pg_has_role(r.oid, 'pg_write_all_data', 'USAGE') THEN 'pg_write_all_data' END
        ], NULL) AS predefined
    FROM pg_catalog.pg_roles AS r, target AS t
    WHERE r.rolname !~ '^pg_'
),
beyond_public AS (
    -- What PUBLIC may do is reported once, in its own row.
    SELECT a.*, ARRAY(
        SELECT p FROM unnest(a.privileges) WITH ORDINALITY AS u(p, n)
        WHERE a.is_owner OR a.rolsuper OR p <> ALL (coalesce(g.privileges, '{}'))
        ORDER BY n) AS own_privileges
    FROM access AS a, public_grants AS g
),
role_rows AS (
    SELECT
        CASE
            WHEN is_owner AND rolsuper THEN 'WARN'
            WHEN is_owner THEN 'PASS'
            WHEN rolsuper AND oid = 10 THEN 'PASS'
            WHEN rolsuper THEN 'WARN'
            WHEN is_allowed THEN 'PASS'
            ELSE 'WARN'
        END AS status,
        concat('role ', quote_ident(rolname), ': ', array_to_string(own_privileges, ', '),
            CASE
                WHEN is_owner AND rolsuper THEN ' (owner, superuser)'
                WHEN is_owner THEN ' (owner)'
                WHEN rolsuper AND oid = 10 THEN ' (bootstrap superuser)'
                WHEN rolsuper THEN ' (superuser)'
                WHEN direct THEN ' (granted)'
                WHEN cardinality(predefined) > 0
                    THEN concat(' (member of ', array_to_string(predefined, ', '), ')')
                ELSE ' (inherited from a role it belongs to)'
            END,
            CASE WHEN is_allowed AND NOT is_owner THEN ', allowed' ELSE '' END,
            CASE WHEN NOT rolcanlogin THEN ', cannot log in' ELSE '' END) AS subject,
        CASE
            WHEN is_owner AND rolsuper
                THEN 'a superuser can switch logging on and read server files: ALTER TABLE '
                     || '"Integration" OWNER TO a dedicated role, and connect the application as it'
            WHEN is_owner OR (rolsuper AND oid = 10) OR (is_allowed AND NOT rolsuper)
                THEN 'nothing to do'
            WHEN rolsuper
                THEN concat('ALTER ROLE ', quote_ident(rolname), ' NOSUPERUSER (unless it must stay one)')
            WHEN direct
                THEN concat('REVOKE ALL ON "Integration" FROM ', quote_ident(rolname),
                            ' (or add it to princeps.audit_allowed_roles)')
            WHEN cardinality(predefined) > 0
                THEN concat('REVOKE ', array_to_string(predefined, ', '), ' FROM ',
                            quote_ident(rolname), ' (or add it to princeps.audit_allowed_roles)')
            ELSE concat('find the granting role with \du ', quote_ident(rolname),
                        ', REVOKE it (or add it to princeps.audit_allowed_roles)')
        END AS remedy,
        rolname
    FROM beyond_public
    WHERE cardinality(own_privileges) > 0
),
all_rows AS (
    SELECT status, subject, remedy, rolname AS sort_key FROM role_rows
    UNION ALL
    SELECT 'FAIL', concat('PUBLIC (every role): ', array_to_string(privileges, ', ')),
           'REVOKE ALL ON "Integration" FROM PUBLIC', ''
    FROM public_grants
    WHERE privileges IS NOT NULL
    UNION ALL
    SELECT 'PASS', 'no other role can read or change "Integration"', 'nothing to do', '~'
    WHERE NOT EXISTS (SELECT FROM role_rows WHERE status <> 'PASS')
      AND NOT EXISTS (SELECT FROM public_grants WHERE privileges IS NOT NULL)
)
SELECT status, 'privileges' AS "check", subject, remedy
FROM all_rows
ORDER BY CASE status WHEN 'FAIL' THEN 0 WHEN 'WARN' THEN 1 ELSE 2 END, sort_key;
