"""The machine-wide node lock: one node per machine, and a second run either refuses or queues."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import node_host

HOLD = """
import sys, time
from e2e import node_host
from pathlib import Path
node_host.LOCK_PATH = Path(sys.argv[1])
node_host.acquire_lock(5.0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def _holder(lock: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A live process holding the lock for ``seconds``, as a running node would."""
    with subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE,
                          text=True, cwd=Path(__file__).resolve().parents[1]) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == "held\n"
            yield process
        finally:
            process.kill()


@pytest.fixture
def lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "node.lock"
    monkeypatch.setattr(node_host, "LOCK_PATH", path)
    return path


def test_a_second_node_is_refused_at_once_naming_the_running_one(lock: Path) -> None:
    with _holder(lock, 30) as holder:
        started = time.monotonic()
        with pytest.raises(node_host.NodeBusyError, match=f"pid {holder.pid} holds"):
            node_host.acquire_lock(15.0)
        assert time.monotonic() - started < 5


def test_with_a_wait_a_second_node_queues_until_the_first_one_ends(lock: Path) -> None:
    with _holder(lock, 1.5) as holder:
        fd = node_host.acquire_lock(15.0, wait_for_running=60.0)
        os.close(fd)
        assert holder.poll() is not None  # the lock came only once the holder was gone
        assert lock.read_text().strip() == str(os.getpid())
