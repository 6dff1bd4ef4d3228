"""The ``princeps-db`` command line (also ``python -m princeps_db``).

Each command lives in its own module and registers itself on ``app``. Errors
a person can fix (bad DATABASE_URL, missing key) print one line and exit 2.
"""

from __future__ import annotations

from princeps_db.cli import audit, demo, keys, migrate
from princeps_db.cli.app import app, main

__all__ = ["app", "audit", "demo", "keys", "main", "migrate"]
