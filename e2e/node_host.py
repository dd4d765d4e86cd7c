"""What the local node changes on the host, and how every change is undone, even after a SIGKILL.

A node is not only its daemons: containerd's shims and the pods' processes are deliberately not
children of containerd (they outlive a containerd restart), kubelet raises three kernel sysctls,
CNI makes a bridge, veths, network namespaces and iptables chains, kube-proxy programs iptables, and
the API server needs an address pods can route to. ``PR_SET_PDEATHSIG`` kills the daemons when the
test process dies, but nothing else. So:

- Before touching the host, :func:`record` writes what will change (the sysctls' current values, the
  address, the daemons' pids) to ``STATE_DIR/host.json``.
- :func:`clean` undoes all of it, idempotently, from that file alone: daemons, shims, every process
  in the ``/kubepods`` cgroups, mounts under ``STATE_DIR`` (netns files, rootfs, Secret tmpfs),
  ``kube-proxy --cleanup``, leftover ``KUBE-*``/``CNI-*`` iptables chains, the bridge, the address,
  the sysctls, kubelet's ``/var/log/containers`` links.
- A janitor (``python -m e2e.node_host watch``, started by the node without a parent-death signal)
  blocks on a pipe from the test process. When the pipe closes without the word ``clean`` (the test
  process died), it runs :func:`clean`. It also holds the node lock until then, so a new node cannot
  start on a half-cleaned host.
- The node itself runs :func:`clean` before starting, for anything a killed janitor left.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = Path("/run/capgate-node")
STATE_FILE = STATE_DIR / "host.json"
LOCK_PATH = Path("/run/capgate-node.lock")
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
CGROUP_ROOT = Path("/sys/fs/cgroup")
POD_CGROUP = "kubepods"
CONTAINER_LOG_LINKS = Path("/var/log/containers")
CHAIN_PREFIXES = ("KUBE-", "CNI-")
KILL_TIMEOUT_SECONDS = 10.0
CLEAN_WORD = b"clean"

Log = Callable[[str], None]


class NodeBusyError(RuntimeError):
    """Another node holds the lock on this machine."""


@dataclass
class HostState:
    """Everything :func:`clean` needs, written before the host is changed."""

    address: str
    bridge: str
    sysctls: dict[str, str] = field(default_factory=dict)
    daemons: dict[str, int] = field(default_factory=dict)  # name -> pid
    kube_proxy: str | None = None  # the binary, for --cleanup


def read_sysctls() -> dict[str, str]:
    return {name: (Path("/proc/sys") / name).read_text().strip() for name in KUBELET_SYSCTLS}


def record(state: HostState) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    temporary = STATE_FILE.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(state)))
    temporary.replace(STATE_FILE)


def _load() -> HostState | None:
    try:
        return HostState(**json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- lock


def acquire_lock(timeout: float, wait_for_running: float = 0.0) -> int:
    """Take the machine-wide node lock (an fd; closing it releases), or raise :class:`NodeBusyError`.

    ``wait_for_running``: seconds to queue behind a running node (several worktrees taking turns on
    one machine) instead of refusing at once.
    """
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    queue_until = time.monotonic() + wait_for_running
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            # A live holder is a running node: refuse at once. A dead one left its janitor holding the
            # lock while it cleans up: wait for that, up to ``timeout``.
            now = time.monotonic()
            if (alive(holder) and now > queue_until) or now > max(deadline, queue_until):
                os.close(fd)
                raise NodeBusyError(
                    f"another capgate node is running on this machine (pid {holder} holds {LOCK_PATH}); "
                    "one node per machine: stop it first (python -m e2e.controlplane down)"
                ) from None
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def alive(pid: int | str) -> bool:
    if not str(pid).isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder() -> int | None:
    """The pid written by the current holder of the lock, if it is held."""
    try:
        fd = os.open(LOCK_PATH, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- clean


def clean(log: Log) -> None:
    """Undo everything a node did to the host (see the module docstring). Safe to run any time."""
    state = _load()
    if state is not None:
        _kill_daemons(state, log)
    _kill_shims(log)
    _kill_pod_cgroups(log)
    _unmount_under(STATE_DIR, log)
    if state is not None and state.kube_proxy and os.access(state.kube_proxy, os.X_OK):
        _run([state.kube_proxy, "--cleanup"], log)
    _remove_chains(log)
    _remove_container_log_links(log)
    if state is not None:
        _run(["ip", "link", "delete", state.bridge], log, quiet=True)
        _run(["ip", "address", "delete", f"{state.address}/32", "dev", "lo"], log, quiet=True)
        for name, value in state.sysctls.items():
            try:
                (Path("/proc/sys") / name).write_text(value)
            except OSError as error:
                log(f"node cleanup: cannot restore {name}={value}: {error}")
    shutil.rmtree(STATE_DIR, ignore_errors=True)


def _run(argv: list[str], log: Log, *, quiet: bool = False) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log(f"node cleanup: {' '.join(argv)}: {error}")
        return
    if result.returncode != 0 and not quiet:
        log(f"node cleanup: {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-500:]}")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_daemons(state: HostState, log: Log) -> None:
    # A recorded pid counts only while its command line still names our state directory or binary:
    # after a reboot or a long time the number may belong to someone else.
    own = [pid for pid in state.daemons.values() if any(str(STATE_DIR) in arg for arg in _cmdline(pid))]
    if own:
        log(f"node cleanup: killing {len(own)} leftover node daemon(s)")
        _kill(own)


def _kill_shims(log: Log) -> None:
    shims = [
        pid
        for pid in _pids()
        if (argv := _cmdline(pid)) and "containerd-shim" in argv[0] and any(str(STATE_DIR) in arg for arg in argv)
    ]
    if shims:
        log(f"node cleanup: killing {len(shims)} containerd shim(s)")
        _kill(shims)


def _pod_cgroups() -> list[Path]:
    """Every cgroup under /kubepods in every v1 hierarchy (or the v2 tree), deepest first."""
    found: list[Path] = []
    roots = [CGROUP_ROOT / POD_CGROUP] if (CGROUP_ROOT / "cgroup.controllers").exists() else []
    if not roots and CGROUP_ROOT.is_dir():
        roots = [hierarchy / POD_CGROUP for hierarchy in CGROUP_ROOT.iterdir()]
    for root in roots:
        if root.is_dir():
            found += [Path(directory) for directory, _, _ in os.walk(root)]
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def _kill_pod_cgroups(log: Log) -> None:
    cgroups = _pod_cgroups()
    if not cgroups:
        return
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while True:
        pids: set[int] = set()
        for cgroup in cgroups:
            with contextlib.suppress(OSError):
                pids.update(int(line) for line in (cgroup / "cgroup.procs").read_text().split())
        if not pids:
            break
        if time.monotonic() > deadline:
            log(f"node cleanup: {len(pids)} pod process(es) survived SIGKILL: {sorted(pids)[:10]}")
            break
        _kill(sorted(pids))
        time.sleep(0.1)
    for cgroup in cgroups:  # deepest first: a cgroup with children cannot be removed
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = line.split(" ")[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def _unmount_under(directory: Path, log: Log) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2  # from <sys/mount.h>
    prefix = str(directory) + "/"
    points = sorted({p for p in _mount_points() if p.startswith(prefix)}, key=len, reverse=True)
    for point in points:
        if libc.umount2(point.encode(), mnt_detach) != 0:
            log(f"node cleanup: umount {point}: {os.strerror(ctypes.get_errno())}")


def _remove_chains(log: Log) -> None:
    """Remove iptables chains named KUBE-*/CNI-* and every rule that jumps to them."""
    for command in ("iptables", "ip6tables"):
        if shutil.which(command) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            listing = subprocess.run([command, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False)
            if listing.returncode != 0:
                continue
            ours = [
                line.split()[1]
                for line in listing.stdout.splitlines()
                if line.startswith("-N ") and line.split()[1].startswith(CHAIN_PREFIXES)
            ]
            for line in listing.stdout.splitlines():
                words = shlex.split(line)  # comments are quoted: `-m comment --comment "CNI firewall ..."`
                if words[:1] == ["-A"] and not words[1].startswith(CHAIN_PREFIXES) and _jumps_to_ours(words):
                    _run([command, "-w", "-t", table, "-D", *words[1:]], log)
            for chain in ours:
                _run([command, "-w", "-t", table, "-F", chain], log)
            for chain in ours:
                _run([command, "-w", "-t", table, "-X", chain], log)


def _jumps_to_ours(words: list[str]) -> bool:
    return any(flag in ("-j", "-g") and target.startswith(CHAIN_PREFIXES) for flag, target in itertools.pairwise(words))


def _remove_container_log_links(log: Log) -> None:
    if not CONTAINER_LOG_LINKS.is_dir():
        return
    removed = 0
    for link in CONTAINER_LOG_LINKS.iterdir():
        if link.is_symlink() and os.readlink(link).startswith(str(STATE_DIR) + "/"):
            link.unlink(missing_ok=True)
            removed += 1
    if removed:
        log(f"node cleanup: removed {removed} link(s) from {CONTAINER_LOG_LINKS}")


# ------------------------------------------------------------------------------------------- janitor


def start_janitor(lock_fd: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the janitor (see the module docstring); write :data:`CLEAN_WORD` to its stdin to dismiss it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "e2e.node_host", "watch"],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed with the test process's group, on purpose
            pass_fds=(lock_fd,),  # holds the node lock until it has cleaned up
            cwd=Path(__file__).resolve().parent.parent,
        )


def dismiss_janitor(janitor: subprocess.Popen[bytes]) -> None:
    if janitor.stdin is not None:
        with contextlib.suppress(BrokenPipeError, OSError):
            janitor.stdin.write(CLEAN_WORD)
            janitor.stdin.close()
    try:
        janitor.wait(5)
    except subprocess.TimeoutExpired:
        janitor.kill()
        janitor.wait()


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _watch() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C for the test run is not ours to obey
    word = sys.stdin.buffer.read()
    if word == CLEAN_WORD:
        return 0
    _print("node janitor: the test process went away without stopping the node; cleaning up")
    clean(_print)
    _print("node janitor: done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.node_host")
    parser.add_argument("command", choices=("watch", "clean"))
    args = parser.parse_args(argv)
    if args.command == "watch":
        return _watch()
    clean(_print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
