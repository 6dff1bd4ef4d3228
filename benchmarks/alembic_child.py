"""The alembic command line, timed from inside: ``python -m benchmarks.alembic_child ARGS``.

Runs ``alembic.config.main`` exactly as the ``alembic`` command does, with the
project's per-batch progress logged to stderr, and prints as its last stdout
line the seconds the command itself took (interpreter start-up and imports
excluded). Its parent reads this process's peak RSS from ``os.wait4``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from alembic.config import main as alembic_main


def main(argv: list[str]) -> int:
    """Run alembic with ``argv``; print ``{"seconds": ...}``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)-5.5s [%(name)s] %(message)s")
    logging.getLogger("princeps_db").setLevel(logging.INFO)
    started = time.perf_counter()
    alembic_main(argv=argv, prog="alembic")
    print(json.dumps({"seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
