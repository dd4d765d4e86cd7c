"""The README's first command works: the demo runs end to end and every decision is the expected one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_plays_the_whole_story_and_leaves_nothing_running() -> None:
    result = subprocess.run([sys.executable, "-m", "e2e.demo"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "ALLOWED" in output
    assert "denied: limit_exceeded (rule charge)" in output
    assert "denied: deny_rule (rule no-deletes)" in output
    assert "invalid_token: revoked" in output
    assert "capgate-headers=none" in output
    assert "Bearer agent-made-this-up" not in output  # the agent's own Authorization never reached the upstream
    assert "every decision as expected" in output
    # Everything the demo starts runs with its temporary directory on the command line.
    leftovers = subprocess.run(["pgrep", "-f", "capgate-demo-"], capture_output=True, text=True, check=False)
    assert leftovers.stdout.strip() == ""
