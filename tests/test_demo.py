"""The README's first command, end to end, as a new developer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_encrypts_a_legacy_database_and_prints_no_secret() -> None:
    cli = Path(sys.executable).parent / "princeps-db"
    result = subprocess.run(
        [str(cli), "demo", "--rows", "300", "--batch-size", "100"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "300 integrations written in plaintext" in output
    assert re.search(r"now shows 0 readable tokens out of 570", output)
    assert "matches" in output and "the original plaintext" in output
    assert "with 1 request to the token endpoint" in output
    assert "Google Calendar call with the refreshed token: 3 upcoming events" in output
    assert re.search(r"rotated 301 rows", output)
    assert "read back with the new key alone" in output and "still matches" in output
    assert "stopped and removed" in output
    assert not re.search(r"ya29\.[A-Za-z0-9]", output), "a token leaked into the demo output"
    assert not re.search(r"[A-Za-z0-9_-]{43}", output), "something key-shaped was printed"
