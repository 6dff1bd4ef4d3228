"""Run the SQL audit suite shipped in ``princeps_db/sql/audit`` and show its results.

The checks are the very files an auditor runs with ``psql -f sql/audit/all.sql``:
``all.sql`` lists them (its ``\\ir`` lines) and this module executes each one
as it is, in a single read-only transaction that is rolled back. Each check
returns rows of (status, check, subject, remedy); none of them reads a key, a
token or a statement text, so the results can be shown and stored freely.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import errors as pg_errors
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine

from princeps_db.errors import ConfigurationError, PrincepsDBError

SUITE = "all.sql"
ALLOWED_ROLES_SETTING = "princeps.audit_allowed_roles"
_INCLUDE = re.compile(r"^\\ir\s+(\S+)\s*$", re.MULTILINE)


class Status(StrEnum):
    """Outcome of one audit row, best first."""

    PASS = "PASS"  # noqa: S105 - a status, not a password
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class AuditResult:
    """One row of an audit check."""

    status: Status
    check: str
    subject: str
    remedy: str
    source: str

    def as_dict(self) -> dict[str, str]:
        """Return the row as plain strings (for JSON)."""
        return {key: str(value) for key, value in asdict(self).items()}


class AuditError(PrincepsDBError):
    """The audit itself could not run (not a finding about the database)."""


def _audit_dir() -> Any:
    return resources.files("princeps_db").joinpath("sql", "audit")


def audit_sql(name: str) -> str:
    """Return the text of one packaged audit file, e.g. ``coverage.sql``."""
    text: str = _audit_dir().joinpath(name).read_text(encoding="utf-8")
    return text


def audit_files() -> list[str]:
    """Return the check files ``all.sql`` includes, in its order."""
    return _INCLUDE.findall(audit_sql(SUITE))


def run_audit(engine: Engine, *, allowed_roles: Iterable[str] = ()) -> list[AuditResult]:
    """Run every check of ``all.sql`` on ``engine``'s database, read-only, and return the rows.

    ``allowed_roles`` are added to ``princeps.audit_allowed_roles``: roles
    expected to read or change ``"Integration"`` (the application, the auditor).
    Raises ``ConfigurationError`` when the database has no ``"Integration"``
    table or the role may not read it, ``AuditError`` for any other failure.
    """
    roles = ",".join(role.strip() for role in allowed_roles if role.strip())
    results: list[AuditResult] = []
    with engine.connect() as connection:
        try:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            if roles:
                connection.execute(
                    sa.text(
                        "SELECT set_config(CAST(:name AS text), concat_ws(',', "
                        "nullif(current_setting(CAST(:name AS text), true), ''), "
                        "CAST(:roles AS text)), true)"
                    ),
                    {"name": ALLOWED_ROLES_SETTING, "roles": roles},
                )
            for name in audit_files():
                results.extend(_run_check(connection, name))
        finally:
            connection.rollback()
    return results


def _run_check(connection: sa.Connection, name: str) -> list[AuditResult]:
    # The driver's own cursor, without parameters, sends the file exactly as psql
    # would (SQLAlchemy's layer would read its % signs as placeholders).
    cursor = connection.connection.cursor()
    try:
        cursor.execute(audit_sql(name))
        rows = cursor.fetchall()
    except pg_errors.UndefinedTable:
        raise ConfigurationError(
            'this database has no "Integration" table: check DATABASE_URL, or run '
            "`princeps-db migrate`"
        ) from None
    except pg_errors.InsufficientPrivilege:
        raise ConfigurationError(
            'the database role may not read "Integration": GRANT SELECT ON "Integration" '
            "TO the auditing role (it reads ciphertext only)"
        ) from None
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AuditError(f"audit check {name} failed: {reason}") from None
    finally:
        cursor.close()
    return [
        AuditResult(Status(status), check, subject, remedy, name)
        for status, check, subject, remedy in rows
    ]


def worst_status(results: Sequence[AuditResult]) -> Status:
    """Return FAIL if any row fails, else WARN if any warns, else PASS."""
    statuses = {result.status for result in results}
    for status in (Status.FAIL, Status.WARN):
        if status in statuses:
            return status
    return Status.PASS


def audit_report(results: Sequence[AuditResult]) -> dict[str, Any]:
    """Return the machine-readable report: overall status, counts and every row."""
    counts = Counter(result.status for result in results)
    return {
        "status": worst_status(results).value,
        "counts": {status.value: counts.get(status, 0) for status in Status},
        "results": [result.as_dict() for result in results],
    }


_STYLES = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def print_audit(console: Console, results: Sequence[AuditResult], *, title: str = "audit") -> None:
    """Print the results as a table, worst rows of each check first, then a summary line."""
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("subject", overflow="fold")
    table.add_column("remedy", overflow="fold")
    for result in results:
        table.add_row(
            Text(result.status.value, style=_STYLES[result.status]),
            Text(result.check),
            Text(result.subject),
            Text(result.remedy),
        )
    console.print(table)
    counts = Counter(result.status for result in results)
    overall = worst_status(results)
    summary = Text.assemble(
        (overall.value, _STYLES[overall]),
        f": {counts.get(Status.FAIL, 0)} fail, {counts.get(Status.WARN, 0)} warn, "
        f"{counts.get(Status.PASS, 0)} pass",
    )
    console.print(summary)
