"""The operator's settings from flags and CAPGATE_* variables: session-key timing (the Helm chart's sessionKeys)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from capgate.operator import config, minting

SERVICE = ["--webhook-service", "capgate-webhook"]


@pytest.fixture(autouse=True)
def _no_capgate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CAPGATE_SESSION_KEY_LIFETIME", "CAPGATE_SESSION_KEY_RENEW_BEFORE"):
        monkeypatch.delenv(name, raising=False)


def test_session_keys_default_to_five_minutes_renewed_150_s_before_they_stop_signing() -> None:
    parsed = config.parse(SERVICE)
    assert (parsed.session_key_lifetime, parsed.session_key_renew_before) == (
        timedelta(minutes=5), timedelta(seconds=150))
    assert parsed.session_key_renew_before == minting.SESSION_KEY_RENEW_BEFORE


def test_session_key_timing_comes_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = config.parse([*SERVICE, "--session-key-lifetime", "2m", "--session-key-renew-before", "80s"])
    assert (parsed.session_key_lifetime, parsed.session_key_renew_before) == (
        timedelta(minutes=2), timedelta(seconds=80))
    monkeypatch.setenv("CAPGATE_SESSION_KEY_LIFETIME", "1h")
    monkeypatch.setenv("CAPGATE_SESSION_KEY_RENEW_BEFORE", "10m")
    parsed = config.parse(SERVICE)
    assert (parsed.session_key_lifetime, parsed.session_key_renew_before) == (timedelta(hours=1),
                                                                              timedelta(minutes=10))


@pytest.mark.parametrize(("lifetime", "renew_before", "says"), [
    ("2m", "2m", "below --session-key-lifetime"),    # every reconcile would write a new key
    ("2m", "0s", "above 0s"),                         # renewed only once expired: receipts would stop
    ("2m", "soon", "is not a duration"),
    ("1.5m", "30s", "is not a duration"),
])
def test_session_key_timing_that_would_leave_a_gap_is_refused_at_start(
        lifetime: str, renew_before: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        config.parse([*SERVICE, "--session-key-lifetime", lifetime, "--session-key-renew-before", renew_before])
    assert says in capsys.readouterr().err
