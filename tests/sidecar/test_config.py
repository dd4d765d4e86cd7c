"""Settings: CLI > CAPGATE_* env > config file > defaults; bad settings fail at start, by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capgate.sidecar import config
from capgate.sidecar.__main__ import main
from tests.sidecar.conftest import capability_document


@pytest.fixture
def standalone(tmp_path: Path, root_key: Path) -> list[str]:
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps(capability_document()))
    return ["--capability", str(cap), "--root-key", str(root_key)]


def test_defaults_apply_when_nothing_is_set(standalone: list[str]) -> None:
    settings = config.load(standalone, {})
    assert str(settings.listen) == "127.0.0.1:15080"
    assert str(settings.admin_listen) == "127.0.0.1:15090"
    assert settings.audit_log == "-"


def test_cli_beats_env_beats_file(standalone: list[str], tmp_path: Path) -> None:
    file = tmp_path / "sidecar.yaml"
    file.write_text("listen: 127.0.0.1:1001\nadmin-listen: 127.0.0.1:2001\nlog_level: debug\n"
                    "upstream-url: {flights: 'http://file:1'}\n")
    env = {"CAPGATE_LISTEN": "127.0.0.1:1002", "CAPGATE_ADMIN_LISTEN": "127.0.0.1:2002",
           "CAPGATE_UPSTREAM_URL": "flights=http://env:1,payments=http://env:2"}
    settings = config.load([*standalone, "--config", str(file), "--listen", "127.0.0.1:1003"], env)
    assert str(settings.listen) == "127.0.0.1:1003"
    assert str(settings.admin_listen) == "127.0.0.1:2002"
    assert settings.log_level == "debug"
    assert settings.upstream_urls == {"flights": "http://env:1", "payments": "http://env:2"}


def test_the_config_file_can_be_named_by_env_and_hold_everything(tmp_path: Path, root_key: Path) -> None:
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps(capability_document()))
    file = tmp_path / "sidecar.json"
    file.write_text(json.dumps({"capability": str(cap), "root-key": str(root_key),
                                "upstream-credential": ["payments=env:KEY"], "read-timeout": 3}))
    settings = config.load([], {"CAPGATE_CONFIG": str(file)})
    assert settings.upstream_credentials["payments"] == config.SecretRef("env", "KEY")
    assert settings.read_timeout == 3.0


@pytest.mark.parametrize(("extra", "env", "named"), [
    (["--listen", "nowhere"], {}, "--listen"),
    ([], {"CAPGATE_ADMIN_LISTEN": "1.2.3.4:99999"}, "CAPGATE_ADMIN_LISTEN"),
    (["--upstream-url", "flights=ftp://x"], {}, "--upstream-url"),
    (["--upstream-credential", "payments=sk_live_pasted_value"], {}, "--upstream-credential"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--read-timeout", "-1"], {}, "--read-timeout"),
])
def test_a_bad_setting_names_itself(standalone: list[str], extra: list[str], env: dict[str, str],
                                    named: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load([*standalone, *extra], env)
    assert caught.value.setting == named
    assert "sk_live_pasted_value" not in str(caught.value)


def test_an_unknown_config_file_key_is_an_error(standalone: list[str], tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("lisen: 127.0.0.1:1\n")
    with pytest.raises(config.ConfigError, match="lisen"):
        config.load([*standalone, "--config", str(file)], {})


def test_standalone_needs_a_capability_and_a_root_key(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load([], {})
    assert caught.value.setting == "--capability"


def test_main_exits_2_without_traceback_on_a_bad_setting(standalone: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*standalone, "--listen", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capgate-sidecar: error: --listen:")
    assert "Traceback" not in err


def test_main_exits_2_on_an_invalid_capability(tmp_path: Path, root_key: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    document = capability_document()
    document["spec"]["rules"][0]["paths"] = ["/a/../b"]
    cap = tmp_path / "bad.json"
    cap.write_text(json.dumps(document))
    assert main(["--capability", str(cap), "--root-key", str(root_key)]) == 2
    assert "--capability: spec.rules[0].paths[0]" in capsys.readouterr().err


def test_main_exits_2_when_an_upstream_credential_variable_is_missing(standalone: list[str],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*standalone, "--upstream-credential", "payments=env:CAPGATE_TEST_SURELY_UNSET"]) == 2
    assert "--upstream-credential: payments" in capsys.readouterr().err


def test_stalled_client_bounds_have_defaults_flags_and_env_variables(standalone: list[str]) -> None:
    defaults = config.load(standalone, {})
    assert (defaults.header_timeout, defaults.body_timeout) == (10.0, 10.0)
    assert (defaults.max_inflight_bytes, defaults.max_connections) == (16 * 1024 * 1024, 2048)

    settings = config.load([*standalone, "--header-timeout", "3", "--max-connections", "64"],
                           {"CAPGATE_BODY_TIMEOUT": "2.5", "CAPGATE_MAX_INFLIGHT_BYTES": "1048576"})
    assert (settings.header_timeout, settings.body_timeout) == (3.0, 2.5)
    assert (settings.max_inflight_bytes, settings.max_connections) == (1048576, 64)
    with pytest.raises(config.ConfigError, match="CAPGATE_HEADER_TIMEOUT"):
        config.load(standalone, {"CAPGATE_HEADER_TIMEOUT": "0"})
