"""The images `make image` builds, for the e2e harness: the one reader of hack/image.sh's output.

    from e2e import images
    saved = images.save().images       # builds what changed (seconds when nothing did), then tarballs
    saved["capgate"].ref               # capgate.local/capgate:<hash of the build's inputs>
    saved["pause"].tarball             # ~/.cache/capgate/images/pause-<hash>.tar, for
                                       # `ctr -n k8s.io images import`

hack/image.sh does the work (and starts dockerd as root if none answers); this module only runs it and
reads its "<name> <reference> [<tarball>]" lines, so the node, the chart install and the image tests
agree on the names.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hack" / "image.sh"
# The client hack/image.sh uses: Debian's 20.10, whose BuildKit is built in.
DOCKER = os.environ.get("CAPGATE_DOCKER", "/usr/bin/docker")
# hack/image.sh's cache (its lock, logs and tarballs), as it reads CAPGATE_CACHE.
CACHE = Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate"))
# A cold build is debootstrap (~75 s) + the image (~30 s) on 2 cores; generous for a slow mirror.
TIMEOUT_S = 1800


class ImageError(RuntimeError):
    """hack/image.sh failed; the message carries the end of its log."""


@dataclass(frozen=True)
class Image:
    name: str
    ref: str
    tarball: Path | None = None


@dataclass(frozen=True)
class Run:
    images: dict[str, Image]
    log: str  # hack/image.sh's progress lines (stderr)


def _run(command: str) -> Run:
    try:
        result = subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, check=False,
                                timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        printed = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        raise ImageError(f"hack/image.sh {command} did not finish within {TIMEOUT_S} s:\n{printed[-3000:]}") from error
    if result.returncode != 0:
        raise ImageError(f"hack/image.sh {command} exited {result.returncode}:\n{result.stderr[-3000:]}")
    found = {}
    for line in result.stdout.splitlines():
        name, ref, *tarball = line.split()
        found[name] = Image(name, ref, Path(tarball[0]) if tarball else None)
    return Run(found, result.stderr)


def build() -> Run:
    """Build (or find) the capgate and pause images in docker."""
    return _run("build")


def save() -> Run:
    """build(), then the tarballs containerd imports (kept in ~/.cache/capgate/images/)."""
    return _run("save")


def refs() -> dict[str, str]:
    """The references the sources would build now, without docker."""
    return {name: image.ref for name, image in _run("ref").images.items()}
