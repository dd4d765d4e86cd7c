"""The README's claims that a command can check: what it says a command prints is what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from capgate import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_shows_the_count_capgate_test_prints() -> None:
    block = README.split("$ capgate test examples/booking-agent.tests.yaml", 1)[1]
    claimed = re.search(r"^(\d+) passed, (\d+) failed$", block, re.MULTILINE)
    assert claimed is not None, "the README's capgate test example lost its summary line"
    result = subprocess.run([sys.executable, "-m", "capgate.cli", "test", "examples/booking-agent.tests.yaml"],
                            capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == claimed.group(0)


def test_the_readme_documents_the_audit_verify_exit_codes() -> None:
    documented = f"exit {cli.EXIT_OK} VERIFIED (every record signed, ledger closed), {cli.EXIT_DENIED} TAMPERED, " \
                 f"{cli.EXIT_UNVERIFIED} UNVERIFIED"
    assert documented in README
