"""The image `make image` builds, run: the Dockerfile's promises checked on the built image, not its text.

`hack/image.sh save` (through e2e/images.py) builds (or finds) the capgate and pause images with
Debian's docker.io and no registry, and saves them as the tarballs the local node imports into
containerd. Each check runs a throw-away container without a network. The build's duration and the
image's size are printed.

Nothing here is skipped: without a docker daemon (or root to start one) the build fails and every
test errors with hack/image.sh's reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e import images

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
SIDECAR_UID = 65532
# Debian's python3 + the locked dependencies measure ~420 MB; a jump past this is a dependency (or a
# cache left in a layer) worth noticing.
SIZE_BUDGET_MB = 500


@dataclass(frozen=True)
class Built:
    refs: dict[str, str]
    tarballs: dict[str, Path]
    seconds: float
    log: str


def _say(config: pytest.Config, line: str) -> None:
    """A line on the terminal even while pytest captures output (the sizes and times this reports)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line, file=sys.stderr, flush=True)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def built(pytestconfig: pytest.Config) -> Built:
    started = time.monotonic()
    try:
        saved = images.save()
    except images.ImageError as error:
        pytest.fail(str(error), pytrace=False)
    seconds = time.monotonic() - started
    if "base image" in saved.log:
        state = "cold: debootstrap, then the build"
    elif "building" in saved.log:
        state = "the base was cached, the image was built"
    else:
        state = "warm: nothing to build"
    _say(pytestconfig, f"make image ({state}): {seconds:.1f} s")
    tarballs = {name: image.tarball for name, image in saved.images.items() if image.tarball}
    return Built({name: image.ref for name, image in saved.images.items()}, tarballs, seconds, saved.log)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([images.DOCKER, *args], capture_output=True, text=True, check=False, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run(image: str, *command: str, options: tuple[str, ...] = (),
        check: bool = True) -> subprocess.CompletedProcess[str]:
    return docker("run", "--rm", "--network=none", *options, image, *command, check=check)


@pytest.fixture(scope="module")
def capgate(built: Built) -> str:
    return built.refs["capgate"]


@pytest.fixture(scope="module")
def no_shell(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """docker run options that leave the container without a usable shell (an empty, non-executable file
    over dash, which /bin/sh points to, and over bash)."""
    empty = tmp_path_factory.mktemp("no-shell") / "empty"
    empty.write_bytes(b"")
    empty.chmod(0o644)
    return tuple(option for target in ("/usr/bin/dash", "/usr/bin/bash")
                 for option in ("--volume", f"{empty}:{target}:ro"))


def test_the_image_runs_as_the_non_root_user_65532(capgate: str) -> None:
    probe = "import json, os; print(json.dumps([os.getuid(), os.getgid(), os.getgroups()]))"
    uid, gid, groups = json.loads(run(capgate, "python", "-c", probe).stdout)
    assert (uid, gid) == (SIDECAR_UID, SIDECAR_UID)
    assert set(groups) <= {SIDECAR_UID}, "no supplementary group (root's least of all)"
    config = json.loads(docker("image", "inspect", capgate).stdout)[0]["Config"]
    assert config["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"


def test_the_user_cannot_change_the_code_it_runs(capgate: str) -> None:
    """A compromised sidecar process must not be able to rewrite capgate or its dependencies."""
    probe = ("import os, sys, sysconfig; paths = [sys.prefix, sysconfig.get_paths()['purelib'], '/usr/lib/python3', "
             "os.path.dirname(os.__file__)]; print([p for p in paths if os.access(p, os.W_OK)])")
    assert run(capgate, "python", "-c", probe).stdout.strip() == "[]"


def test_the_default_command_is_the_operator_without_an_entrypoint(capgate: str) -> None:
    config = json.loads(docker("image", "inspect", capgate).stdout)[0]["Config"]
    assert config["Entrypoint"] is None
    assert config["Cmd"] == ["capgate-operator"]


def test_the_shell_is_really_gone_in_the_no_shell_container(capgate: str, no_shell: tuple[str, ...]) -> None:
    """The check below means something only if a command that needs /bin/sh fails there."""
    assert run(capgate, "sh", "-c", "true", check=False).returncode == 0
    assert run(capgate, "sh", "-c", "true", options=no_shell, check=False).returncode != 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_runs_without_a_shell(capgate: str, no_shell: tuple[str, ...], script: str) -> None:
    """Every [project.scripts] entry is a command of the image: the chart, the injected sidecar and the
    init container run them by name, exec form, as the image's user."""
    result = run(capgate, script, "--help", options=no_shell, check=False)
    assert result.returncode == 0, f"{script} --help exited {result.returncode}: {result.stderr[-2000:]}"
    assert "usage" in result.stdout.lower()


def test_pip_check_passes_and_the_image_holds_exactly_the_lock(capgate: str) -> None:
    assert "No broken requirements found." in run(capgate, "python", "-m", "pip", "check").stdout
    installed = {entry["name"].lower().replace("_", "-"): entry["version"]
                 for entry in json.loads(run(capgate, "python", "-m", "pip", "list", "--format=json").stdout)}
    locked = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[name.lower().replace("_", "-")] = version
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert installed.pop("pip")  # pip stays, for pip check
    assert installed == {**locked, "capgate": version}


def test_iptables_programs_a_network_namespace_as_capgate_init_will(capgate: str) -> None:
    """The nf_tables backend, the owner match and REDIRECT, as root with only NET_ADMIN and NET_RAW."""
    rules = [["iptables", "-V"],
             ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", str(SIDECAR_UID),
              "-j", "RETURN"],
             ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
             ["ip6tables", "-P", "OUTPUT", "DROP"],
             ["iptables", "-t", "nat", "-S", "OUTPUT"]]
    program = ("import json, subprocess, sys\n"
               "for argv in json.loads(sys.argv[1]):\n"
               "    subprocess.run(argv, check=True)\n")
    options = ("--user", "0", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW")
    result = run(capgate, "python", "-c", program, json.dumps(rules), options=options, check=False)
    assert result.returncode == 0, result.stderr
    assert "(nf_tables)" in result.stdout
    assert "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001" in result.stdout


def test_the_image_fits_its_size_budget(capgate: str, pytestconfig: pytest.Config) -> None:
    size_mb = int(docker("image", "inspect", "--format", "{{.Size}}", capgate).stdout) / 1e6
    _say(pytestconfig, f"image {capgate}: {size_mb:.0f} MB")
    assert size_mb < SIZE_BUDGET_MB


def test_a_second_make_image_builds_nothing(built: Built) -> None:
    result = subprocess.run(["make", "-s", "image"], cwd=REPO, capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert dict(line.split() for line in result.stdout.splitlines()) == built.refs == images.refs()
    assert "up to date" in result.stderr and "building" not in result.stderr and "pause image" not in result.stderr


def _holders(path: Path) -> list[str]:
    """Every process with `path` open, as "<pid> <command>"."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if Path(fd.readlink()) == path:
                pid = fd.parts[2]
                found.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()}")
        except OSError:  # gone, or not ours to read
            continue
    return sorted(set(found))


def test_no_process_keeps_the_image_lock_once_a_build_is_done(built: Built) -> None:
    """dockerd, started by the first build, once inherited the lock: every later build then waited forever."""
    assert _holders(images.CACHE / "image.lock") == []


@pytest.fixture
def pause_container(built: Built) -> Iterator[str]:
    container = docker("run", "--detach", "--network=none", built.refs["pause"]).stdout.strip()
    try:
        yield container
    finally:
        docker("rm", "--force", container, check=False)


def test_pause_holds_the_sandbox_and_stops_cleanly_on_sigterm(pause_container: str) -> None:
    """A PID 1 without a SIGTERM handler ignores it, and every pod stop would wait for SIGKILL (137)."""
    state = json.loads(docker("inspect", pause_container).stdout)[0]
    assert state["State"]["Running"] and state["Config"]["User"] == "65535:65535"
    docker("kill", "--signal", "TERM", pause_container)
    assert docker("wait", pause_container).stdout.strip() == "0"


def test_saved_tarballs_hold_their_image_under_its_name(built: Built) -> None:
    """What `ctr -n k8s.io images import` reads: one image, tagged with the reference pods name."""
    for name, ref in built.refs.items():
        tarball = built.tarballs[name]
        assert tarball.parent.name == "images" and tarball.is_file()
        with tarfile.open(tarball) as archive:
            manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
            assert [entry["RepoTags"] for entry in manifest] == [[ref]]
            if name == "pause":  # a static binary and nothing else
                (layer,) = manifest[0]["Layers"]
                with tarfile.open(fileobj=archive.extractfile(layer)) as files:
                    assert files.getnames() == ["pause"]
    assert built.tarballs["capgate"].name == f"capgate-{built.refs['capgate'].rsplit(':', 1)[1]}.tar"
