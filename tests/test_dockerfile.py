"""The image: one Dockerfile for operator, sidecar and init container, non-root, every dependency pinned.

These checks read the files: what the Dockerfile runs exists as a console script, what the chart and the
injected pod run is that image's commands, requirements.lock is a complete, pinned closure of
pyproject.toml's runtime dependencies, and hack/image.sh's tag follows exactly the build's inputs.
e2e/test_image.py checks the same promises on the image `make image` builds.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shlex
import shutil
import subprocess
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
# The interpreters of the two bases, for environment markers: python:3.12-slim, and Debian bookworm's
# python3 in the base `make image` builds without a registry.
TARGET_PYTHONS = ("3.11", "3.12")
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


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each FROM ... stage, in order."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The words of each `pip install` a stage runs."""
    commands = []
    for keyword, rest in stage:
        if keyword == "RUN":
            for command in re.split(r"&&|;", rest):
                words = shlex.split(command)
                if words and words[0].startswith("--mount="):
                    words = words[1:]
                runs_pip = bool(words) and (Path(words[0]).name == "pip" or words[:3] == ["python", "-m", "pip"])
                if runs_pip and "install" in words:
                    commands.append(words)
    return commands


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
    assert [rest for keyword, rest in instructions() if keyword == "FROM"] == ["${PYTHON_IMAGE} AS deps",
                                                                               "deps AS build", "${PYTHON_IMAGE}"]


def test_the_build_pulls_nothing_but_the_base() -> None:
    """A `# syntax=` line makes BuildKit pull a frontend image: the offline build must not need one."""
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE, re.IGNORECASE | re.MULTILINE)
    script = (REPO / "hack" / "image.sh").read_text()
    assert '--build-arg "PYTHON_IMAGE=$base_ref"' in script, "the local build replaces the base through the ARG"


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
    """The lock, then capgate, both --no-deps: no resolver at build time picks a version of its own."""
    deps, build, runtime = stages()
    (lock_install,) = pip_installs(deps)
    assert "--no-deps" in lock_install and lock_install[lock_install.index("-r") + 1].endswith("requirements.lock")
    assert ("ENV", "PIP_NO_CACHE_DIR=1") in [(k, r.split()[0]) for k, r in deps if k == "ENV"]
    assert build[0] == ("FROM", "deps AS build")
    # The runtime takes the locked virtualenv, adds the capgate wheel from no index, and checks the whole.
    assert ("COPY", "--from=deps /opt/capgate /opt/capgate") in runtime
    (capgate_install,) = pip_installs(runtime)
    assert {"--no-deps", "--no-index"} <= set(capgate_install) and capgate_install[-1] == "/wheels/capgate-*.whl"
    runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert "python -m pip check" in runs  # the lock is a consistent closure, or the build fails


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
    """Whether either base's interpreter would install this requirement."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"python_version": python, "python_full_version": f"{python}.0",
                                            "extra": "", "sys_platform": "linux", "platform_system": "Linux",
                                            "os_name": "posix"})
               for python in TARGET_PYTHONS)


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


def test_the_image_tag_hashes_the_context_dockerignore_lets_in() -> None:
    """hack/image.sh hashes the context by these rules (find ... ! -name '*.pyc' ...): change both together."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore == ["*", "!pyproject.toml", "!README.md", "!requirements.lock", "!capgate/",
                      "**/__pycache__", "**/*.pyc", "**/*.pyo"]
    script = (REPO / "hack" / "image.sh").read_text()
    assert "printf '%s\\n' Dockerfile .dockerignore pyproject.toml README.md requirements.lock" in script
    assert "find capgate -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.pyo'" in script


def _image_refs(repo: Path) -> dict[str, str]:
    result = subprocess.run(["bash", str(repo / "hack" / "image.sh"), "ref"], capture_output=True, text=True,
                            check=True)
    return dict(line.split() for line in result.stdout.splitlines())


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """What hack/image.sh reads, copied: Dockerfile, the build context, the script and the pause source."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "requirements.lock",
                 "hack/image.sh", "hack/pause/pause.c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "capgate", tmp_path / "capgate", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("changed", ["capgate/sidecar/app.py", "requirements.lock", "Dockerfile", "README.md",
                                     "pyproject.toml"])
def test_the_image_tag_changes_with_every_input_of_the_build(repo_copy: Path, changed: str) -> None:
    """`make image` reuses an existing tag as the build: a tag that missed an input would ship stale code."""
    before = _image_refs(repo_copy)
    assert before == _image_refs(REPO)
    with (repo_copy / changed).open("a") as file:
        file.write("\n# changed\n")
    after = _image_refs(repo_copy)
    assert after["capgate"] != before["capgate"]
    assert after["pause"] == before["pause"]


def test_the_image_tag_ignores_what_the_build_never_sees(repo_copy: Path) -> None:
    before = _image_refs(repo_copy)
    (repo_copy / "capgate" / "__pycache__").mkdir()
    (repo_copy / "capgate" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"stale")
    (repo_copy / "tests").mkdir()
    (repo_copy / "tests" / "test_new.py").write_text("")
    assert _image_refs(repo_copy) == before


def test_the_project_virtualenv_is_installed_exactly_from_both_locks() -> None:
    """hack/setup.sh installs -e .[dev] with both locks as constraints: what runs the tests is what is pinned."""
    import sys

    result = subprocess.run([sys.executable, str(REPO / "hack" / "lock-requirements.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    setup = (REPO / "hack" / "setup.sh").read_text()
    assert "-c requirements.lock -c requirements-dev.lock" in setup
    assert sys.prefix != sys.base_prefix, "the tests run from the project virtualenv, never the system interpreter"
