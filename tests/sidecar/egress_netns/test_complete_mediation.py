"""Complete mediation with the real kernel: capgate-init's rules, the outbound listener, a hostile agent.

No kubelet, but everything a pod's network is made of: a network namespace for the pod (its ``lo``
and a veth), ``capgate-init`` programming it with the real ``iptables``/``ip6tables`` (nft), the
sidecar running as UID 65532 inside it, and an agent process running as UID 1000 that ignores
``HTTP_PROXY`` and dials addresses itself. Upstreams and bystanders live in a second namespace at
the other end of the veth (:mod:`peers`); what they *received* is what the assertions check. No
packet leaves the two namespaces this test creates.

Needs root, ``ip``, ``setpriv``, ``iptables-nft``; without them the test fails and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from capgate.capabilities import keys

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _unprivileged_python() -> tuple[str, dict[str, str]]:
    """An interpreter other UIDs can execute, with this checkout and its packages importable.

    The test's own interpreter may live under a directory only root can enter (a pyenv in /root).
    """
    probe = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, check=False) if SYSTEM_PYTHON.exists() else None
    if probe is None or probe.stdout.strip() != str(tuple(sys.version_info[:2])):
        return sys.executable, {}
    path = [str(HERE.parents[2]), *site.getsitepackages()]
    return str(SYSTEM_PYTHON), {"PYTHONPATH": os.pathsep.join(path)}
POD_IP, UPSTREAM_IP, BYSTANDER_IP = "10.231.0.1", "10.231.0.2", "10.231.0.3"
POD_IP6, UPSTREAM_IP6 = "fd00:231::1", "fd00:231::2"
SIDECAR_UID, AGENT_UID = 65532, 1000
DROPPED = {"TimeoutError", "PermissionError"}
FLIGHTS_KEY = "flights-key-SECRET-0001"
PAYMENTS_KEY = "payments-key-SECRET-0002"
CAPABILITY = {
    "apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
    "metadata": {"name": "egress-agent", "namespace": "travel"},
    "spec": {
        "serviceAccountName": "egress-agent",
        "upstreams": [
            {"name": "flights", "url": f"http://{UPSTREAM_IP}:8080",
             "inject": {"secretRef": {"name": "flights-key", "key": "token"}, "valuePrefix": "Bearer ",
                        "allowInsecureTransport": True}},
            {"name": "payments", "url": "https://payments.test:8443",
             "inject": {"secretRef": {"name": "payments-key", "key": "token"}, "valuePrefix": "Bearer "}},
        ],
        "rules": [
            {"name": "search", "effect": "allow", "upstream": "flights", "methods": ["GET"], "paths": ["/search"]},
            {"name": "balance", "effect": "allow", "upstream": "payments", "methods": ["GET"],
             "paths": ["/v1/balance"]},
        ],
    },
}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "must run as root (it creates network namespaces and runs processes as other UIDs)"
    for tool in ("ip", "setpriv", "iptables-restore", "ip6tables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _certificate(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None,
                 *, ca: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
               .not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pod:
    name: str
    upstream_ns: str
    workdir: Path
    peers_log: Path
    audit_log: Path
    ca_file: Path

    def run(self, uid: int, *argv: str, env: dict[str, str] | None = None, timeout: float = 20
            ) -> subprocess.CompletedProcess[str]:
        command = ["ip", "netns", "exec", self.name, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                   "--clear-groups", "env", "-i", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def agent(self, *args: str, uid: int = AGENT_UID) -> dict[str, Any]:
        """Run the hostile agent; it trusts the pod CA the way injected containers do."""
        done = self.run(uid, "/usr/bin/python3", str(self.workdir / "agent.py"), *args,
                        env={"SSL_CERT_FILE": str(self.ca_file), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def arrived(self) -> list[dict[str, Any]]:
        """What reached the world outside the pod."""
        if not self.peers_log.exists():
            return []
        return [json.loads(line) for line in self.peers_log.read_text().splitlines() if line]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    def refusals_to(self, destination: str) -> list[dict[str, Any]]:
        return [r for r in self.audit()
                if r.get("reason") == "undeclared_destination" and r.get("destination") == destination]


def _sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True)


def _wait(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _network(pod_ns: str, up_ns: str, tag: str) -> None:
    for ns in (pod_ns, up_ns):
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    _sh("ip", "link", "add", f"cgp{tag}", "netns", pod_ns, "type", "veth", "peer", "name", f"cgu{tag}",
        "netns", up_ns)
    for ns, dev, addresses in ((pod_ns, f"cgp{tag}", [f"{POD_IP}/24"]),
                               (up_ns, f"cgu{tag}", [f"{UPSTREAM_IP}/24", f"{BYSTANDER_IP}/24"])):
        for address in addresses:
            _sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
        _sh("ip", "-n", ns, "addr", "add", (POD_IP6 if ns == pod_ns else UPSTREAM_IP6) + "/64", "dev", dev, "nodad")
        _sh("ip", "-n", ns, "link", "set", dev, "up")


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    missing = _missing()
    if missing:
        pytest.fail(f"complete-mediation test cannot run: {missing}")
    tag = str(os.getpid() % 100000)
    pod_ns, up_ns = f"cgeg-pod-{tag}", f"cgeg-up-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix="capgate-egress-"))
    etc = Path("/etc/netns") / pod_ns  # `ip netns exec` bind-mounts these over /etc in the pod namespace
    processes: list[subprocess.Popen[str]] = []
    try:
        workdir.chmod(0o755)
        _network(pod_ns, up_ns, tag)
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{UPSTREAM_IP} payments.test\n")

        ca_key, ca_cert = _certificate("egress test upstream CA", None, None, ca=True)
        leaf_key, leaf_cert = _certificate("payments.test", ca_key, ca_cert.subject, ca=False)
        (workdir / "upstream-ca.crt").write_bytes(_pem(ca_cert))
        (workdir / "payments.crt").write_bytes(_pem(leaf_cert))
        (workdir / "payments.key").write_bytes(leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        for script in ("agent.py", "peers.py"):
            shutil.copy(HERE / script, workdir / script)
        peers_log = workdir / "peers.jsonl"
        peers = subprocess.Popen(["ip", "netns", "exec", up_ns, sys.executable, str(workdir / "peers.py"),
                                  str(peers_log), str(workdir / "payments.crt"), str(workdir / "payments.key")],
                                 stdout=subprocess.PIPE, text=True)
        processes.append(peers)
        assert peers.stdout is not None and peers.stdout.readline().strip() == "ready"

        init = subprocess.run(["ip", "netns", "exec", pod_ns, str(VENV_BIN / "capgate-init"), "--dns", UPSTREAM_IP],
                              capture_output=True, text=True, check=False)
        assert init.returncode == 0, init.stderr

        sidecar_dir = workdir / "sidecar"
        ca_dir = workdir / "ca"
        for directory in (sidecar_dir, ca_dir):
            directory.mkdir()
            os.chown(directory, SIDECAR_UID, SIDECAR_UID)
        keyset = keys.KeySet.generate()
        keyset.write(sidecar_dir)
        (sidecar_dir / "capability.yaml").write_text(yaml.safe_dump(CAPABILITY))
        for path in sidecar_dir.iterdir():
            os.chown(path, SIDECAR_UID, SIDECAR_UID)
        audit_log = sidecar_dir / "audit.jsonl"
        python, python_env = _unprivileged_python()
        sidecar_env = {"SSL_CERT_FILE": str(workdir / "upstream-ca.crt"), "FLIGHTS_KEY": FLIGHTS_KEY,
                       "PAYMENTS_KEY": PAYMENTS_KEY, **python_env}
        sidecar = subprocess.Popen(
            ["ip", "netns", "exec", pod_ns, "setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}",
             "--clear-groups", "env", *(f"{k}={v}" for k, v in sidecar_env.items()),
             python, "-m", "capgate.sidecar", "--capability", str(sidecar_dir / "capability.yaml"),
             "--root-key", str(sidecar_dir / "root.key"), "--audit-log", str(audit_log),
             "--listen", "127.0.0.1:15080", "--admin-listen", "127.0.0.1:15090",
             "--outbound-listen", "127.0.0.1:15001", "--ca-dir", str(ca_dir),
             "--upstream-credential", "flights=env:FLIGHTS_KEY", "--upstream-credential", "payments=env:PAYMENTS_KEY"],
            stderr=subprocess.PIPE, text=True)
        processes.append(sidecar)
        result = Pod(pod_ns, up_ns, workdir, peers_log, audit_log, ca_dir / "ca.crt")

        def healthy() -> bool:
            assert sidecar.poll() is None, sidecar.stderr.read() if sidecar.stderr else ""
            return result.agent("http", "http://127.0.0.1:15090/healthz").get("status") == 200
        _wait(healthy, "the sidecar's /healthz inside the pod namespace")
        yield result
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        for ns in (pod_ns, up_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _http_arrivals(pod: Pod, path: str) -> list[dict[str, Any]]:
    return [e for e in pod.arrived() if e["kind"] == "http" and e["path"] == path]


def test_declared_http_upstream_called_by_its_real_url_is_decided_and_gets_its_key(pod: Pod) -> None:
    allowed = pod.agent("http", f"http://{UPSTREAM_IP}:8080/search")
    assert allowed["status"] == 200 and allowed["body"] == {"ok": True, "path": "/search"}
    [seen] = _http_arrivals(pod, "/search")
    assert seen["authorization"] == f"Bearer {FLIGHTS_KEY}"

    denied = pod.agent("http", f"http://{UPSTREAM_IP}:8080/admin")
    assert denied["status"] == 403 and denied["body"]["reason"] == "no_matching_rule"
    assert _http_arrivals(pod, "/admin") == []


def test_declared_https_upstream_called_by_its_real_url_is_intercepted_with_the_pod_ca(pod: Pod) -> None:
    allowed = pod.agent("https", "https://payments.test:8443/v1/balance")
    assert allowed == {"status": 200, "body": {"ok": True, "path": "/v1/balance"}}
    [seen] = [e for e in _http_arrivals(pod, "/v1/balance") if e["port"] == 8443]
    assert seen["authorization"] == f"Bearer {PAYMENTS_KEY}"

    denied = pod.agent("https", "https://payments.test:8443/v1/refunds")
    assert denied["status"] == 403 and denied["body"]["reason"] == "no_matching_rule"
    assert _http_arrivals(pod, "/v1/refunds") == []


def test_the_pod_ca_key_is_never_published(pod: Pod) -> None:
    published = sorted(p.name for p in pod.ca_file.parent.iterdir())
    assert published == ["ca.crt"]
    assert b"PRIVATE KEY" not in pod.ca_file.read_bytes()


def test_undeclared_address_is_refused_with_403_and_audited(pod: Pod) -> None:
    refused = pod.agent("http", f"http://{BYSTANDER_IP}:8080/search")
    assert refused["status"] == 403 and refused["body"]["reason"] == "undeclared_destination"
    assert [e for e in _http_arrivals(pod, "/search") if e["local"] == BYSTANDER_IP] == []
    assert pod.refusals_to(f"{BYSTANDER_IP}:8080")


def test_forged_host_sent_to_another_address_never_gets_the_key(pod: Pod) -> None:
    """``Host`` names flights, the socket went to the bystander: no key, no request, anywhere."""
    before = len(_http_arrivals(pod, "/search"))
    forged = pod.agent("http", f"http://{BYSTANDER_IP}:8080/search", f"{UPSTREAM_IP}:8080")
    assert forged["status"] == 403 and forged["body"]["reason"] == "undeclared_destination"
    assert len(_http_arrivals(pod, "/search")) == before


def test_a_host_inside_tls_that_differs_from_the_server_name_is_refused(pod: Pod) -> None:
    before = len(pod.arrived())
    result = pod.agent("https-host", "https://payments.test:8443/v1/balance", f"{UPSTREAM_IP}:8443")
    assert result["status"] == 403 and result["body"]["reason"] == "undeclared_destination"
    assert len(pod.arrived()) == before


def test_raw_bytes_to_a_declared_upstream_address_are_refused(pod: Pod) -> None:
    before = len(pod.arrived())
    result = pod.agent("tcp", UPSTREAM_IP, "8080")
    assert result.get("received", "") == "", result
    assert len(pod.arrived()) == before
    assert pod.refusals_to(f"{UPSTREAM_IP}:8080")


def test_tls_to_an_undeclared_address_is_refused_before_the_handshake(pod: Pod) -> None:
    refused = pod.agent("tls", BYSTANDER_IP, "8443", "payments.test")
    assert "error" in refused, refused
    assert pod.refusals_to(f"{BYSTANDER_IP}:8443")
    wrong_name = pod.agent("tls", UPSTREAM_IP, "8443", "evil.test")
    assert "error" in wrong_name, wrong_name


def test_raw_tcp_is_refused_and_never_reaches_the_peer(pod: Pod) -> None:
    result = pod.agent("tcp", BYSTANDER_IP, "9000")
    assert result.get("received", "") == "", result  # closed by the sidecar, nothing from the peer
    assert [e for e in pod.arrived() if e["kind"] == "tcp"] == []
    assert pod.refusals_to(f"{BYSTANDER_IP}:9000")


def test_udp_is_dropped_except_dns_to_the_resolver(pod: Pod) -> None:
    assert pod.agent("udp", UPSTREAM_IP, "53") == {"reply": "exfiltrate"}  # the resolver exemption
    # A local DROP in OUTPUT fails sendto() with EPERM; either way, nothing may arrive.
    assert pod.agent("udp", UPSTREAM_IP, "5353")["error"] in DROPPED
    assert pod.agent("udp", BYSTANDER_IP, "53")["error"] in DROPPED
    assert {e["port"] for e in pod.arrived() if e["kind"] == "udp"} == {53}


def test_ipv6_is_dropped(pod: Pod) -> None:
    result = pod.agent("tcp6", UPSTREAM_IP6, "9000")
    assert result.get("error") in DROPPED, result
    assert [e for e in pod.arrived() if e["kind"] == "tcp" and e["family"] == 10] == []


def test_the_sidecar_uid_itself_reaches_out(pod: Pod) -> None:
    result = pod.agent("tcp", BYSTANDER_IP, "9000", uid=SIDECAR_UID)
    assert result == {"connected": True, "received": "peer says hello\n"}
    assert pod.agent("udp", UPSTREAM_IP, "5353", uid=SIDECAR_UID) == {"reply": "exfiltrate"}


def test_the_agent_port_still_serves_the_path_form(pod: Pod) -> None:
    result = pod.agent("http", "http://127.0.0.1:15080/flights/search")
    assert result["status"] == 200


def test_dialling_the_outbound_listener_directly_is_refused(pod: Pod) -> None:
    result = pod.agent("http", "http://127.0.0.1:15001/search", f"{UPSTREAM_IP}:8080")
    assert "error" in result or result.get("status") == 403, result


def test_connections_others_open_to_the_pod_still_get_replies(pod: Pod) -> None:
    """What kubelet probes and the agent's own Service need: replies to inbound TCP are not egress."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, "setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
         "--clear-groups", "/usr/bin/python3", "-m", "http.server", "18080", "--bind", POD_IP,
         "--directory", str(pod.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = [sys.executable, "-c", "import sys, urllib.request as u; "
                 f"print(u.urlopen('http://{POD_IP}:18080/agent.py', timeout=3).status)"]

        def answered() -> bool:
            done = subprocess.run(["ip", "netns", "exec", pod.upstream_ns, *probe], capture_output=True, text=True,
                                  check=False)
            return done.stdout.strip() == "200"
        _wait(answered, "the agent's server to answer a connection from outside the pod", timeout=15)
    finally:
        server.terminate()
        server.wait(10)
