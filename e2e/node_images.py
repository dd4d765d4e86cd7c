"""The two images the local node needs and no registry can give it: the pod sandbox and a test image.

Both are made here, without docker, as ``docker save`` archives (``manifest.json`` + config +
one layer), which ``ctr images import`` reads. The layer is built deterministically (sorted entries,
mtime 0, root-owned), so the same inputs give the same image ID and a cached import stays valid.

- ``capgate.local/pause:3.10``, containerd's ``sandbox_image``: a static build of Kubernetes' own
  ``pause.c`` (the copy in ``hack/pause/`` when present, else the one in the ``k8s.io/kubernetes``
  module that ``hack/build-controlplane.sh`` downloaded). It must be PID 1 of the sandbox: it reaps
  zombies and exits on SIGTERM, so pods stop at once instead of after the kill grace period.
- ``capgate.local/busybox:e2e``: Debian's static busybox with a symlink per applet, plus ``kubeget``
  (``hack/controlplane/kubeget``, Go's standard library only): busybox's TLS offers no signature
  algorithms, which kube-apiserver rightly refuses, and never verifies a certificate. Tests use ``sh``,
  ``wget``, ``nslookup``, ``httpd`` and ``kubeget`` as real processes in real pods.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAUSE_IMAGE = "capgate.local/pause:3.10"
BUSYBOX_IMAGE = "capgate.local/busybox:e2e"
BUSYBOX = Path("/bin/busybox")  # Debian package busybox-static
KUBE_MODULE = "k8s.io/kubernetes@v1.35.8"
KUBEGET_MODULE = REPO_ROOT / "hack" / "controlplane" / "kubeget"


class ImageBuildError(RuntimeError):
    """A prerequisite (compiler, static busybox, pause.c) is missing; the message names it."""


@dataclass(frozen=True)
class _Entry:
    path: str  # inside the image, without a leading slash
    data: bytes | None = None  # a regular file; None with link_to for a symlink, neither for a directory
    mode: int = 0o755
    link_to: str | None = None


def _layer(entries: Iterable[_Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(entries, key=lambda e: e.path):
            info = tarfile.TarInfo(entry.path)
            info.mtime = 0
            info.mode = entry.mode
            if entry.link_to is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.link_to
                tar.addfile(info)
            elif entry.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


def _archive(reference: str, layer: bytes, config: dict[str, object]) -> bytes:
    """A ``docker save`` archive of a one-layer image tagged ``reference``."""
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    image_config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(image_config).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [reference], "Layers": [layer_name]}]).encode()
    return _layer(
        [
            _Entry("manifest.json", manifest, 0o644),
            _Entry(config_name, image_config, 0o644),
            _Entry(layer_name.split("/")[0]),
            _Entry(layer_name, layer, 0o644),
        ]
    )


def _pause_source() -> Path:
    candidates = [REPO_ROOT / "hack" / "pause" / "pause.c"]
    cache = Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate"))
    gomodcache = Path(os.environ.get("GOMODCACHE", cache / "go" / "mod"))
    candidates.append(gomodcache / KUBE_MODULE / "build" / "pause" / "linux" / "pause.c")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ImageBuildError(
        "no pause.c found (looked in " + ", ".join(map(str, candidates)) + "); run hack/build-controlplane.sh"
    )


def _compile_pause(workdir: Path) -> bytes:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ImageBuildError("a C compiler (Debian package gcc, with libc6-dev) is needed to build pause")
    output = workdir / "pause"
    result = subprocess.run(
        [compiler, "-Os", "-static", "-DVERSION=3.10", "-o", str(output), str(_pause_source())],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"compiling pause failed:\n{result.stderr}")
    return output.read_bytes()


def pause_archive(workdir: Path) -> bytes:
    layer = _layer([_Entry("pause", _compile_pause(workdir))])
    return _archive(PAUSE_IMAGE, layer, {"Entrypoint": ["/pause"], "User": "65535:65535"})


def _build_kubeget(workdir: Path) -> bytes:
    go = shutil.which("go")
    if go is None:
        raise ImageBuildError("the go toolchain is needed to build kubeget (as for hack/build-controlplane.sh)")
    cache = Path(os.environ.get("CAPGATE_CACHE", Path.home() / ".cache" / "capgate"))
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "local"),
        "GOCACHE": os.environ.get("GOCACHE", str(cache / "go" / "build")),
    }
    output = workdir / "kubeget"
    result = subprocess.run(
        [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(output), "."],
        cwd=KUBEGET_MODULE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"building kubeget failed:\n{result.stderr}")
    return output.read_bytes()


def busybox_archive(workdir: Path) -> bytes:
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    entries = [
        _Entry("bin"),
        _Entry("bin/busybox", BUSYBOX.read_bytes()),
        _Entry("bin/kubeget", _build_kubeget(workdir)),
        _Entry("etc"),
        _Entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
        _Entry("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644),
        _Entry("tmp", mode=0o1777),
        _Entry("root", mode=0o700),
        *(_Entry(f"bin/{applet}", link_to="busybox") for applet in applets if applet != "busybox"),
    ]
    config: dict[str, object] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"}
    return _archive(BUSYBOX_IMAGE, _layer(entries), config)


def build(directory: Path) -> dict[str, Path]:
    """Write both archives into ``directory`` (rebuilt every time: about a second) and return them."""
    directory.mkdir(parents=True, exist_ok=True)
    archives = {PAUSE_IMAGE: pause_archive(directory), BUSYBOX_IMAGE: busybox_archive(directory)}
    paths = {}
    for reference, data in archives.items():
        path = directory / (reference.rsplit("/", 1)[-1].replace(":", "_") + ".tar")
        path.write_bytes(data)
        paths[reference] = path
    return paths
