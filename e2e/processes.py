"""Child processes of the local cluster: own process group, parent-death signal, a log file each.

Shared by the control plane (e2e/controlplane.py) and the node (e2e/node.py), so both stop their
children the same way and show the same log tails on failure.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 40
STOP_GRACE_SECONDS = 10.0


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(errors="replace") as file:
            return "".join(collections.deque(file, maxlen=lines))
    except OSError as error:
        return f"<cannot read {path}: {error}>"


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when the starting thread dies (Linux).

    Only armed from the main thread: a worker thread may legitimately exit long before its children
    should stop.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1  # from <linux/prctl.h>

    def arm() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grace_seconds: float = STOP_GRACE_SECONDS

    def describe_exit(self) -> str:
        code = self.process.returncode
        return f"{self.name} exited with code {code}; log {self.log_path}:\n{tail(self.log_path)}"

    def stop(self) -> None:
        """SIGTERM the child's process group, then SIGKILL it after a grace period."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.grace_seconds)
        # Even after the leader exited, kill stragglers left in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    grace_seconds: float = STOP_GRACE_SECONDS,
) -> Child:
    """Start ``argv`` in its own session, output appended to ``log_dir/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,  # own process group: killable as a whole, deaf to the tty's ^C
            preexec_fn=parent_death_signal(),  # only prctl, see parent_death_signal
        )
    return Child(name, process, log_path, grace_seconds)


def free_ports(count: int) -> list[int]:
    """Loopback ports the kernel just had free; held open together so that they differ from each other."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def direct_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """An opener that ignores HTTP(S)_PROXY: urllib would send even 127.0.0.1 through a proxy."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def answers_ok(url: str, *, context: ssl.SSLContext | None = None, timeout: float = 1) -> bool:
    """Whether ``url`` answers 200 now (a readiness probe of a local process; any failure is "not yet")."""
    try:
        with direct_opener(context).open(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as error:
        error.close()
        return False
    except OSError:
        return False
