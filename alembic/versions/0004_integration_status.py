"""Integration status: whether the stored grant still works.

``active`` is the normal state. ``reauthorization_required`` is set when the
provider answered a refresh with ``invalid_grant`` (the user revoked access,
or the grant expired): the application stops calling the provider for that
integration until the user reconnects, which resets it to ``active``.

It comes before the contract revision so that the new application, which
reads it, can be deployed while the legacy application still runs (see the
downtime-free order in docs/04_DEVELOPER_PLAYBOOK.md).

The column is added with a constant default (no table rewrite, instant) and
the CHECK constraint ``NOT VALID``; it is validated after the first commit,
under a lock that does not block reads or writes.

Revision ID: 0004_integration_status
Revises: 0003_backfill
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_integration_status"
down_revision: str | None = "0003_backfill"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS_CHECK = "Integration_status_check"


def upgrade() -> None:
    op.execute("ALTER TABLE \"Integration\" ADD COLUMN status text NOT NULL DEFAULT 'active'")
    op.execute(
        f'ALTER TABLE "Integration" ADD CONSTRAINT "{STATUS_CHECK}" '
        "CHECK (status IN ('active', 'reauthorization_required')) NOT VALID"
    )
    with op.get_context().autocommit_block():
        op.execute(f'ALTER TABLE "Integration" VALIDATE CONSTRAINT "{STATUS_CHECK}"')


def downgrade() -> None:
    op.execute(f'ALTER TABLE "Integration" DROP CONSTRAINT IF EXISTS "{STATUS_CHECK}"')
    op.execute('ALTER TABLE "Integration" DROP COLUMN IF EXISTS status')
