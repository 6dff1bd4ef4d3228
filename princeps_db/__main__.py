"""``python -m princeps_db``: the same command line as ``princeps-db``."""

from princeps_db.cli import main

main()
