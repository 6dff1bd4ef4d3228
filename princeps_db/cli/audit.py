"""``princeps-db audit``: the SQL audit suite, as a table or as JSON."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from princeps_db.audit import AuditError, Status, audit_report, print_audit, run_audit, worst_status
from princeps_db.cli.app import app, fail, friendly_errors, out_console
from princeps_db.config import load_settings
from princeps_db.db import create_engine


@app.command()
def audit(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON report on stdout instead of a table.")
    ] = False,
    allow_role: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-role",
            metavar="ROLE",
            help='A role expected to read or change "Integration" (repeatable); adds to the '
            "princeps.audit_allowed_roles database setting.",
        ),
    ] = None,
) -> None:
    """Audit the database: token coverage, ciphertext format, server settings, privileges.

    Runs, read-only, the same SQL as `psql -f sql/audit/all.sql` (shipped inside
    the package). Needs DATABASE_URL only, never the encryption key. Exit code 1
    if any check FAILs, 0 otherwise, 2 if the database cannot be audited.

    Examples:

        DATABASE_URL=postgresql://auditor@db/princeps princeps-db audit

        princeps-db audit --allow-role princeps_app --allow-role auditor

        princeps-db audit --json | jq '.results[] | select(.status != "PASS")'
    """
    with friendly_errors():
        # Auditing reads no token: DATABASE_URL only, no key, no development key file.
        settings = load_settings(require_key=False)
        engine = create_engine(settings, application_name="princeps-db audit")
        try:
            results = run_audit(engine, allowed_roles=allow_role or ())
        except AuditError as error:
            fail(str(error))
        finally:
            engine.dispose()
    if json_output:
        typer.echo(json.dumps(audit_report(results), indent=2))
    else:
        print_audit(out_console, results, title="princeps-db audit")
    if worst_status(results) is Status.FAIL:
        raise typer.Exit(1)
