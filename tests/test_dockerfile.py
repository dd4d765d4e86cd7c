"""The image: one Dockerfile for operator and sidecar, non-root, with every runtime dependency pinned.

There is no container engine here, so these checks are static: what the Dockerfile runs exists as a
console script, what the chart and the injected pod run is that image's commands, and
requirements.lock is a complete, pinned closure of pyproject.toml's runtime dependencies.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from capgate import injection

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TARGET_PYTHON = "3.12"  # the base image's interpreter, for environment markers
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines()
                                            if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"requirements.lock: {line!r} is not a NAME==VERSION pin"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = match["version"]
    return pins


def test_base_image_is_python_312_slim_pinned_by_tag() -> None:
    (arg,) = [rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.12\.\d+-slim-[a-z]+", image), image
    assert [rest for keyword, rest in instructions() if keyword == "FROM"] == ["${PYTHON_IMAGE} AS build",
                                                                               "${PYTHON_IMAGE}"]


def test_image_runs_as_the_non_root_user_65532() -> None:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users == ["65532:65532"]
    assert injection.SidecarSettings().run_as_user == 65532  # what the injected sidecar declares
    values = yaml.safe_load((REPO / "helm" / "capgate" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 65532


def test_default_command_is_the_operator_and_there_is_no_entrypoint() -> None:
    assert not [rest for keyword, rest in instructions() if keyword == "ENTRYPOINT"]
    (cmd,) = [rest for keyword, rest in final_stage() if keyword == "CMD"]
    assert cmd == '["capgate-operator"]'


def test_every_command_the_image_is_run_with_is_a_console_script() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    (cmd,) = [rest for keyword, rest in final_stage() if keyword == "CMD"]
    deployment = (REPO / "helm" / "capgate" / "templates" / "deployment.yaml").read_text()
    (chart_command,) = re.findall(r'command: \["([^"]+)"\]', deployment)
    # The webhook builds the sidecar container with this command.
    assert '"command": ["capgate-sidecar"]' in Path(injection.__file__).read_text()
    for command in (cmd.strip('[]"'), chart_command, "capgate-sidecar"):
        assert command in scripts, f"{command} is not a [project.scripts] entry of pyproject.toml"
        module, _, function = scripts[command].partition(":")
        assert (REPO / Path(*module.split("."))).with_suffix(".py").exists(), scripts[command]
        assert f"def {function}(" in (REPO / Path(*module.split("."))).with_suffix(".py").read_text()


def test_dependencies_are_installed_exactly_from_the_lock() -> None:
    runs = " ".join(rest for keyword, rest in final_stage() if keyword == "RUN")
    words = shlex.split(runs.replace("&&", " && "))
    assert "--no-cache-dir" in words
    assert "-r" in words and words[words.index("-r") + 1].endswith("requirements.lock")
    assert words.count("--no-deps") == 2  # the lock, then the capgate wheel: no resolver at build time
    assert "check" in words  # pip check: the lock is a consistent closure, or the build fails


def test_lock_pins_every_runtime_dependency_of_pyproject() -> None:
    pins = lock()
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock does not pin {requirement.name}"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {requirement}")
    dev = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert not dev & set(pins), "development tools do not belong in the image"


def _applies(requirement: Requirement) -> bool:
    env = {"python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    return requirement.marker is None or requirement.marker.evaluate(env)


def test_lock_is_closed_over_the_dependencies_of_what_it_pins() -> None:
    """Every locked package's own requirements are locked too (checked with the installed metadata)."""
    pins = lock()
    unchecked, missing = [], []
    for name, version in pins.items():
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unchecked.append(name)
            continue
        if distribution.version != version:
            unchecked.append(name)
            continue
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if _applies(requirement) and canonicalize_name(requirement.name) not in pins:
                missing.append(f"{name} needs {requirement}")
    assert not missing, f"requirements.lock is not closed (python hack/lock-requirements.py): {missing}"
    if unchecked:
        pytest.fail(f"installed versions differ from requirements.lock for {unchecked}: "
                    "pip install -r requirements.lock, or regenerate it with python hack/lock-requirements.py")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            copied.update(source.rstrip("/") for source in sources)
    assert copied <= allowed, f"COPY uses files .dockerignore leaves out: {copied - allowed}"
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_the_project_virtualenv_is_installed_exactly_from_both_locks() -> None:
    """hack/setup.sh installs -e .[dev] with both locks as constraints: what runs the tests is what is pinned."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "hack" / "lock-requirements.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    setup = (REPO / "hack" / "setup.sh").read_text()
    assert "-c requirements.lock -c requirements-dev.lock" in setup
    assert sys.prefix != sys.base_prefix, "the tests run from the project virtualenv, never the system interpreter"
