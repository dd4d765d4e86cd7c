"""The outbound listener's pure decisions: which declared upstream a captured request names, if any.

The end-to-end behaviour (real REDIRECT, real SO_ORIGINAL_DST, real agents) is in
``egress_netns/test_complete_mediation.py``; these pin the matching rules an attacker would probe.
"""

from __future__ import annotations

import ssl

import pytest

from capgate.capabilities import spec
from capgate.sidecar import egress, podca
from tests.sidecar.conftest import capability_document

CAP = spec.parse_capability(capability_document())  # flights http://flights.travel.svc:8080, payments https://...


@pytest.mark.parametrize(("value", "tls", "expected"), [
    ("flights.travel.svc:8080", False, ("flights.travel.svc", 8080)),
    ("Payments.Example.com", True, ("payments.example.com", 443)),
    ("payments.example.com", False, ("payments.example.com", 80)),
    ("10.0.0.7:8080", False, ("10.0.0.7", 8080)),
    ("[::1]:8080", False, None),
    ("payments.example.com.", True, None),
    ("user@payments.example.com", True, None),
    ("payments.example.com:0", True, None),
    ("payments.example.com:https", True, None),
    ("", False, None),
])
def test_host_header_is_a_plain_name_and_port(value: str, tls: bool, expected: tuple[str, int] | None) -> None:
    assert egress.host_port(value, tls) == expected


def test_a_declared_upstream_needs_its_scheme_host_and_port() -> None:
    assert egress.declared(CAP, {}, host="flights.travel.svc", port=8080, tls=False).upstream.name == "flights"
    assert egress.declared(CAP, {}, host="payments.example.com", port=443, tls=True).upstream.name == "payments"
    assert egress.declared(CAP, {}, host="flights.travel.svc", port=8081, tls=False) is None
    assert egress.declared(CAP, {}, host="payments.example.com", port=443, tls=False) is None  # plaintext to https
    assert egress.declared(CAP, {}, host="flights.travel.svc", port=8080, tls=True) is None
    assert egress.declared(CAP, {}, host="flights", port=8080, tls=False) is None  # the upstream's name is no host


def test_a_url_with_a_path_prefix_is_matched_and_captured_paths_must_lie_under_it() -> None:
    document = capability_document()
    document["spec"]["upstreams"][0]["url"] = "http://flights.travel.svc:8080/api/v2"
    cap = spec.parse_capability(document)
    assert egress.declared(cap, {}, host="flights.travel.svc", port=8080, tls=False) == egress.Declared(
        cap.upstreams[0], "/api/v2")
    assert egress.under_prefix("/api/v2/search?q=1", "/api/v2") == "/search?q=1"
    assert egress.under_prefix("/api/v2", "/api/v2") == "/"
    assert egress.under_prefix("/api/v2?x", "/api/v2") == "/?x"
    assert egress.under_prefix("/search", "") == "/search"
    for outside in ("/api/v2x/search", "/api/v3/search", "/API/v2/search", "/api/%76%32/search", "/", "/api"):
        assert egress.under_prefix(outside, "/api/v2") is None, outside


def test_two_upstreams_at_one_address_are_ambiguous_and_refused() -> None:
    document = capability_document()
    document["spec"]["upstreams"].append({"name": "flights-admin", "url": "http://flights.travel.svc:8080/admin"})
    cap = spec.parse_capability(document)
    assert egress.declared(cap, {}, host="flights.travel.svc", port=8080, tls=False) is None


async def test_an_ip_literal_host_agrees_only_with_that_address() -> None:
    resolver = egress.Resolver()
    assert await resolver.has("10.0.0.7", "10.0.0.7", 80)
    assert not await resolver.has("10.0.0.7", "10.0.0.8", 80)


async def test_a_name_that_does_not_resolve_agrees_with_nothing() -> None:
    assert not await egress.Resolver().has("no-such-host.invalid", "10.0.0.7", 80)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str | None) -> None:
    """A full TLS handshake in memory between two real OpenSSL endpoints."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=name)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", tls_client), ("server", tls_server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_pod_ca_leaf_is_trusted_by_a_client_that_trusts_only_the_pod_ca() -> None:
    ca = podca.PodCA()
    client = ssl.create_default_context(cadata=ca.pem.decode())
    _handshake(ca.context_for("payments.example.com"), client, "payments.example.com")


def test_a_leaf_refuses_a_handshake_for_another_name() -> None:
    ca = podca.PodCA()
    client = ssl.create_default_context(cadata=ca.pem.decode())
    client.check_hostname = False
    with pytest.raises(ssl.SSLError):
        _handshake(ca.context_for("payments.example.com"), client, "evil.example.com")


def test_another_pods_ca_is_not_trusted() -> None:
    client = ssl.create_default_context(cadata=podca.PodCA().pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(podca.PodCA().context_for("payments.example.com"), client, "payments.example.com")


def test_only_the_ca_certificate_is_published(tmp_path) -> None:
    ca = podca.PodCA()
    written = ca.write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ca.crt"]
    assert written.read_bytes() == ca.pem and b"PRIVATE" not in ca.pem
    assert written.stat().st_mode & 0o777 == 0o444


def test_the_outbound_listener_and_ca_dir_are_settings_like_any_other(tmp_path) -> None:
    from capgate.sidecar import config

    base = ["--capability", "examples/booking-agent.yaml", "--root-key", str(tmp_path / "root.key")]
    (tmp_path / "root.key").write_text("{}")
    settings = config.load([*base, "--ca-dir", str(tmp_path)], {"CAPGATE_OUTBOUND_LISTEN": "127.0.0.1:15001"})
    assert str(settings.outbound_listen) == "127.0.0.1:15001" and settings.ca_dir == tmp_path
    assert config.load(base, {}).outbound_listen is None  # off unless asked for (pods in enforce mode ask)
    with pytest.raises(config.ConfigError, match="--ca-dir"):
        config.load([*base, "--ca-dir", str(tmp_path / "missing")], {})
