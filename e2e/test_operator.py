"""The operator end to end on the real API server: mint, inject, enforce, rotate, revoke, lock down.

The operator runs as a local process; the API server calls its webhooks over TLS on 127.0.0.1.
Pods are admitted and mutated by the real admission chain; with no kubelet, the injected sidecar is
started locally with the pod spec's own command, args, env and Secret files (see e2e/cluster.py).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capgate import ledger, resources
from capgate.capabilities import keys, receipts
from e2e.cluster import Environment, agent_pod, call, environment, example_capability, wait_for
from e2e.controlplane import ControlPlane
from tests.crd_samples import SAMPLES, Sample

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "travel"
API_KEY = "sk_live_e2e_4f9a1c0b7d2e"
PROPAGATION_CLAIM = 1.0
"""Seconds from the write (kubectl patch, `capgate revoke`/`lockdown` returning) to the first refusal: the
README's security table promises "within a second"; bench/revocation.py measures the distribution."""
Cluster = Environment


def capability(name: str, **spec_changes: Any) -> dict[str, Any]:
    return example_capability(name, NAMESPACE, **spec_changes)


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    with environment(control_plane, tmp_path_factory.mktemp("operator"), NAMESPACE, API_KEY) as env:
        # Every test may lean on the example capability and one agent pod, whatever runs first.
        env.apply(capability("booking-agent"))
        env.wait_ready("booking-agent")
        result = env.create_pod("agent-1", "booking-agent")
        assert result.returncode == 0, result.stderr
        yield env


# ------------------------------------------------------------------------------------------ minting

def test_applying_the_example_mints_a_credential_and_reports_ready(cluster: Cluster) -> None:
    status = cluster.wait_ready("booking-agent")

    secret = cluster.secret(status["credentialSecret"])
    assert secret is not None
    assert set(secret) == {resources.TOKEN_FILE, resources.SESSION_KEY_FILE, resources.TRUST_BUNDLE_FILE,
                           resources.SETTINGS_FILE}
    assert status["revocationIds"] and status["expiresAt"] and status["issuedAt"]
    assert status["upstreams"] == 2 and status["rules"] == 3
    token = secret[resources.TOKEN_FILE].decode()
    assert token not in json.dumps(cluster.get_capability("booking-agent"))
    table = cluster.plane.kubectl("get", "acap", "-n", NAMESPACE).stdout
    assert "READY" in table and "UPSTREAMS" in table and "EXPIRES" in table
    assert "booking-agent" in table and "True" in table


def test_the_credential_secret_is_owned_by_the_capability(cluster: Cluster) -> None:
    obj = cluster.get_capability("booking-agent")
    result = cluster.plane.kubectl("get", "secret", "booking-agent-capgate-credential", "-n", NAMESPACE, "-o", "json")
    owners = json.loads(result.stdout)["metadata"]["ownerReferences"]
    assert owners[0]["uid"] == obj["metadata"]["uid"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_the_api_server_and_webhook_decide_each_sample_as_the_model_does(cluster: Cluster, sample: Sample) -> None:
    obj = sample.build()
    obj["metadata"]["name"] = "sample-" + "".join(c if c.isalnum() else "-" for c in sample.name.lower())[:40]
    obj["spec"].pop("datalog", None) if "datalog" not in sample.name else None
    result = cluster.apply(obj, check=False)
    try:
        assert (result.returncode == 0) == sample.model_accepts, result.stderr
        if not sample.model_accepts and sample.webhook:
            assert "validate.capgate.dev" in result.stderr  # refused by our webhook, with its message
    finally:
        cluster.plane.kubectl("delete", "acap", obj["metadata"]["name"], "-n", NAMESPACE, "--ignore-not-found",
                              "--wait=false")


def test_a_bad_glob_is_rejected_at_apply_with_the_field_path(cluster: Cluster) -> None:
    bad = capability("bad-glob")
    bad["spec"]["rules"][0]["paths"] = ["/search/../admin"]
    result = cluster.apply(bad, check=False)
    assert result.returncode != 0
    assert "spec.rules[0].paths[0]: '..' segments are not allowed" in result.stderr


# ------------------------------------------------------------------------------------------ injection

def test_a_labelled_pod_gets_the_native_sidecar_and_proxy_settings(cluster: Cluster) -> None:
    pod = json.loads(cluster.plane.kubectl("get", "pod", "agent-1", "-n", NAMESPACE, "-o", "json").stdout)
    init, sidecar = pod["spec"]["initContainers"][:2]
    assert init["name"] == "capgate-init"  # programs the pod network first, then the sidecar starts
    assert sidecar["name"] == "capgate-sidecar" and sidecar["restartPolicy"] == "Always"
    agent_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert agent_env["HTTP_PROXY"] == "http://127.0.0.1:15080"
    assert agent_env["CAPGATE_UPSTREAM_PAYMENTS_URL"] == "http://127.0.0.1:15080/payments"
    mounted = {m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts") or []}
    assert {n for n in mounted if n.startswith("capgate-")} == {"capgate-ca"}  # the pod CA certificate only


def test_cooperative_egress_injects_no_init_container_and_says_pods_are_not_mediated(cluster: Cluster) -> None:
    cluster.plane.kubectl("create", "serviceaccount", "coop-agent", "-n", NAMESPACE)
    cluster.apply(capability("coop-agent", serviceAccountName="coop-agent", egress={"mode": "cooperative"}))
    status = cluster.wait_ready("coop-agent")
    mediated = next(c for c in status["conditions"] if c["type"] == "Mediated")
    assert (mediated["status"], mediated["reason"]) == ("False", "Cooperative")
    assert "MEDIATED" in cluster.plane.kubectl("get", "acap", "coop-agent", "-n", NAMESPACE, "-o", "wide").stdout
    pod = agent_pod("coop-1", NAMESPACE, "coop-agent", "coop-agent")
    del pod["spec"]["securityContext"]  # cooperative mode has no UID exemption to protect
    assert cluster.apply(pod, check=False).returncode == 0
    created = json.loads(cluster.plane.kubectl("get", "pod", "coop-1", "-n", NAMESPACE, "-o", "json").stdout)
    assert [c["name"] for c in created["spec"]["initContainers"]] == ["capgate-sidecar"]
    assert created["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] == ["NET_ADMIN", "NET_RAW"]


def test_enforce_mode_refuses_an_agent_whose_uid_is_left_to_its_image(cluster: Cluster) -> None:
    pod = agent_pod("unknown-uid", NAMESPACE, "booking-agent", "booking-agent")
    del pod["spec"]["securityContext"]
    result = cluster.apply(pod, check=False)
    assert result.returncode != 0
    assert "sets no runAsUser" in result.stderr and "65532" in result.stderr


def test_a_pod_with_the_wrong_service_account_is_refused(cluster: Cluster) -> None:
    result = cluster.create_pod("intruder", "booking-agent", service_account="default")
    assert result.returncode != 0
    assert "pod runs as ServiceAccount 'default'" in result.stderr


def test_a_pod_naming_an_unknown_capability_is_refused(cluster: Cluster) -> None:
    result = cluster.create_pod("lost", "no-such-capability")
    assert result.returncode != 0
    assert "AgentCapability travel/no-such-capability" in result.stderr


def test_pods_without_the_label_are_not_touched(cluster: Cluster) -> None:
    pod = agent_pod("plain", NAMESPACE, "x", "default")
    del pod["metadata"]["labels"]
    assert cluster.apply(pod).returncode == 0
    created = json.loads(cluster.plane.kubectl("get", "pod", "plain", "-n", NAMESPACE, "-o", "json").stdout)
    assert not created["spec"].get("initContainers")


# ------------------------------------------------------------------------------------------ enforcement

def test_the_injected_sidecar_enforces_the_capability(cluster: Cluster) -> None:
    sidecar = cluster.sidecar("agent-1")
    try:
        status, _, headers = call(sidecar, "GET", "/flights/search?from=SFO", headers={"Authorization": "Bearer agent"})
        assert status == 200 and "X-Capgate-Receipt" in headers
        status, _, _ = call(sidecar, "POST", "/payments/v1/charges", {"amount": 30000})
        assert status == 200  # the receipt the sidecar holds for this pod's session satisfies "requires"
        status, body, _ = call(sidecar, "POST", "/payments/v1/charges", {"amount": 500000})
        assert (status, body["error"], body["reason"]) == (403, "denied", "limit_exceeded")
        status, body, _ = call(sidecar, "DELETE", "/flights/search/1")
        assert (status, body["rule"]) == (403, "no-deletes")
        charges = [s for s in cluster.upstream.seen if s.path == "/v1/charges"]
        assert charges and all(s.headers.get("Authorization") == f"Bearer {API_KEY}" for s in charges)
        assert not any(h.lower().startswith("x-capgate") for s in cluster.upstream.seen for h in s.headers)
        assert not any(s.headers.get("Authorization") == "Bearer agent" for s in cluster.upstream.seen)
    finally:
        sidecar.stop()


def report_propagation(capsys: pytest.CaptureFixture[str], what: str, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n    propagation ({what}): {seconds * 1000:.0f} ms")
    assert seconds < PROPAGATION_CLAIM, f"README claims {what} within {PROPAGATION_CLAIM} s, took {seconds:.2f} s"


def test_revoking_a_capability_denies_within_a_second(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.apply(capability("revocable"))
    cluster.wait_ready("revocable")
    assert cluster.create_pod("agent-revocable", "revocable").returncode == 0
    sidecar = cluster.sidecar("agent-revocable")
    try:
        assert call(sidecar, "GET", "/flights/search")[0] == 200
        started = time.monotonic()
        cluster.plane.kubectl("patch", "acap", "revocable", "-n", NAMESPACE, "--type=merge",
                              "-p", '{"spec":{"revoked":true}}')
        _, body, _ = wait_for(lambda: (r := call(sidecar, "GET", "/flights/search"))[0] == 401 and r,
                                   10, "the revocation to reach the sidecar", interval=0.01)
        assert body["reason"] == "revoked"
        report_propagation(capsys, "kubectl patch revoked: true → sidecar denies", time.monotonic() - started)
    finally:
        sidecar.stop()
    status_now = cluster.get_capability("revocable")["status"]
    assert status_now["conditions"][0]["reason"] == "Revoked"


def test_a_spec_change_mints_a_new_credential_and_revokes_the_old(cluster: Cluster) -> None:
    cluster.apply(capability("changing"))
    first = cluster.wait_ready("changing")["revocationIds"]
    changed = capability("changing")
    changed["spec"]["rules"][1]["limits"][0]["max"] = 1000
    cluster.apply(changed)
    second = cluster.wait_ready("changing")["revocationIds"]
    assert second != first
    listed = json.loads(cluster.plane.kubectl("get", "revocationlist", "capgate", "-o", "json").stdout)
    assert first[0] in {e["id"] for e in listed["spec"]["revokedIds"]}


def test_a_short_lived_credential_rotates_without_interrupting_requests(cluster: Cluster) -> None:
    cluster.apply(capability("short", credential={"ttl": "20s", "rotateBefore": "12s"}))
    first = cluster.wait_ready("short")["revocationIds"][0]
    assert cluster.create_pod("agent-short", "short").returncode == 0
    sidecar = cluster.sidecar("agent-short")
    try:
        statuses = []
        deadline = time.monotonic() + 16
        while time.monotonic() < deadline:
            statuses.append(call(sidecar, "GET", "/flights/search")[0])
            time.sleep(0.2)
        current = cluster.get_capability("short")["status"]["revocationIds"][0]
    finally:
        sidecar.stop()
    assert current != first, "the operator rotated the credential"
    assert set(statuses) == {200}, f"every request during rotation was allowed: {sorted(set(statuses))}"


def test_an_operator_restart_keeps_credentials_and_keeps_reconciling(cluster: Cluster) -> None:
    before = cluster.wait_ready("booking-agent")["revocationIds"]
    cluster.operator.kill()
    cluster.operator.start()
    cluster.apply(capability("after-restart"))
    cluster.wait_ready("after-restart")
    assert cluster.wait_ready("booking-agent")["revocationIds"] == before


def test_deleting_a_capability_revokes_its_credential(cluster: Cluster) -> None:
    cluster.apply(capability("short-lived-object"))
    ids = cluster.wait_ready("short-lived-object")["revocationIds"]
    cluster.plane.kubectl("delete", "acap", "short-lived-object", "-n", NAMESPACE, "--timeout=30s")
    listed = json.loads(cluster.plane.kubectl("get", "revocationlist", "capgate", "-o", "json").stdout)
    assert ids[0] in {e["id"] for e in listed["spec"]["revokedIds"]}


def test_the_session_key_is_endorsed_for_its_capability_and_credential(cluster: Cluster) -> None:
    status = cluster.wait_ready("booking-agent")
    data = cluster.secret("booking-agent-capgate-credential")
    assert data is not None
    key = receipts.SessionKey.from_json(data[resources.SESSION_KEY_FILE])
    assert (key.capability, key.credential) == (f"{NAMESPACE}/booking-agent", status["revocationIds"][0])


def test_another_capabilitys_session_key_cannot_forge_a_receipt_this_sidecar_accepts(cluster: Cluster) -> None:
    cluster.apply(capability("thief"))
    cluster.wait_ready("thief")
    stolen_data = cluster.secret("thief-capgate-credential")
    assert stolen_data is not None
    stolen = receipts.SessionKey.from_json(stolen_data[resources.SESSION_KEY_FILE])
    victim = cluster.wait_ready("booking-agent")["revocationIds"][0]
    now = int(time.time())
    payload = json.dumps({"rule": "search", "corr": "forged-1", "cap": f"{NAMESPACE}/booking-agent", "cred": victim,
                          "iat": now, "exp": now + 300, "did": "forged", "sid": stolen.key_id},
                         sort_keys=True, separators=(",", ":")).encode()
    forged = f"v1.{_b64(payload)}.{_b64(stolen.sign(payload))}.{stolen.endorsement}"
    sidecar = cluster.sidecar("agent-1")
    try:
        status, body, _ = call(sidecar, "POST", "/payments/v1/charges", {"amount": 100},
                               headers={"X-Capgate-Correlation-Id": "forged-1", "X-Capgate-Receipt": forged})
    finally:
        sidecar.stop()
    assert (status, body["reason"]) == (403, "missing_receipt")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_an_opted_in_cleartext_injection_shows_in_status_and_as_a_warning_event(cluster: Cluster) -> None:
    cleartext = capability("cleartext")
    cleartext["spec"]["upstreams"][1]["url"] = "http://payments.travel.svc:8080"
    refused = cluster.apply(cleartext, check=False)
    assert refused.returncode != 0
    assert "spec.upstreams[1].url" in refused.stderr and "inject.allowInsecureTransport: true" in refused.stderr
    cleartext["spec"]["upstreams"][1]["inject"]["allowInsecureTransport"] = True
    cluster.apply(cleartext)
    status = cluster.wait_ready("cleartext")
    found = next(c for c in status["conditions"] if c["type"] == "InsecureInjection")
    assert (found["status"], found["reason"]) == ("True", "AllowInsecureTransport")
    assert "payments" in found["message"]

    def warning() -> list[dict[str, Any]]:
        listed = cluster.plane.kubectl("get", "events", "-n", NAMESPACE, "-o", "json",
                                       "--field-selector", "involvedObject.name=cleartext,reason=InsecureInjection")
        return [e for e in json.loads(listed.stdout)["items"] if e["type"] == "Warning"]

    assert wait_for(warning, 15, "the InsecureInjection Warning event")
    assert "InsecureInjection" not in {c["type"] for c in cluster.wait_ready("booking-agent")["conditions"]}


def test_the_operator_exports_metrics(cluster: Cluster) -> None:
    text = cluster.operator.metrics()
    assert "capgate_operator_credentials_minted_total" in text
    assert "capgate_operator_webhook_seconds_bucket" in text
    assert API_KEY not in text


# ------------------------------------------------------------------------------------------ the capgate CLI

def capgate_cli(cluster: Cluster, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "capgate.cli", *args, "--kubeconfig", str(cluster.plane.kubeconfig)],
                          capture_output=True, text=True, check=False, cwd=ROOT)


def test_capgate_revoke_token_refuses_a_narrowed_token_but_not_its_parent(cluster: Cluster,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = cluster.sidecar("agent-1")
    try:
        status, narrowed, _ = call(sidecar, "POST", "/_capgate/v1/attenuate", {"rules": ["search"], "ttl": "5m"})
        assert status == 200, narrowed
        token = {"X-Capgate-Token": narrowed["token"]}
        assert call(sidecar, "GET", "/flights/search", headers=token)[0] == 200
        result = capgate_cli(cluster, "revoke", "--token", narrowed["revocationIds"][-1])
        assert result.returncode == 0, result.stderr
        written = time.monotonic()
        status, body, _ = wait_for(lambda: (r := call(sidecar, "GET", "/flights/search", headers=token))[0] == 401
                                   and r, 10, "the narrowed token's revocation", interval=0.01)
        assert body["reason"] == "revoked"
        report_propagation(capsys, "capgate revoke --token → sidecar denies", time.monotonic() - written)
        assert call(sidecar, "GET", "/flights/search")[0] == 200  # the pod's own credential still works
    finally:
        sidecar.stop()


def test_capgate_lockdown_refuses_writes_until_lifted(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = cluster.sidecar("agent-1")
    try:
        assert capgate_cli(cluster, "lockdown", "--namespace", NAMESPACE).returncode == 0
        written = time.monotonic()
        _, body, _ = wait_for(lambda: (r := call(sidecar, "POST", "/payments/v1/charges", {"amount": 100}))[0]
                                   == 503 and r, 10, "the lockdown to reach the sidecar", interval=0.01)
        assert body["error"] == "lockdown"
        report_propagation(capsys, "capgate lockdown → sidecar refuses writes", time.monotonic() - written)
        assert call(sidecar, "GET", "/flights/search")[0] == 200  # reads are still decided by policy
        assert capgate_cli(cluster, "lockdown", "--namespace", NAMESPACE, "--off").returncode == 0
        wait_for(lambda: call(sidecar, "POST", "/payments/v1/charges", {"amount": 100})[0] == 200, 10,
                 "the lockdown to be lifted")
    finally:
        sidecar.stop()


def test_rotating_the_root_key_re_mints_credentials_under_the_new_key(cluster: Cluster) -> None:
    before = cluster.wait_ready("booking-agent")["revocationIds"]
    result = capgate_cli(cluster, "keys", "rotate", "--cluster", "--operator-namespace", "capgate-system")
    assert result.returncode == 0, result.stderr
    status = wait_for(lambda: (s := cluster.ready("booking-agent")) and s["revocationIds"] != before and s, 30,
                      "a credential under the new root key")
    assert status["conditions"][0]["reason"] in ("RootKeyRotated", "Issued")
    secret = cluster.secret(status["credentialSecret"])
    assert secret is not None
    trust = json.loads(secret[resources.TRUST_BUNDLE_FILE])
    assert len(trust["keys"]) == 2  # the old key keeps verifying tokens it signed until its notAfter


@pytest.mark.parametrize(("verb", "resource", "name", "allowed"), [
    ("get", "secrets", "booking-agent-capgate-credential", False),
    ("list", "secrets", "", False),
    ("watch", "revocationlists", "capgate", True),
    ("get", "revocationlists", "capgate", True),
    ("update", "revocationlists", "capgate", False),
])
def test_the_agent_service_account_reads_revocations_and_never_its_credential(
        cluster: Cluster, verb: str, resource: str, name: str, allowed: bool) -> None:
    group = resources.GROUP if resource == "revocationlists" else ""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": f"system:serviceaccount:{NAMESPACE}:booking-agent",
                       "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
                       "resourceAttributes": {"verb": verb, "resource": resource, "group": group, "name": name,
                                              "namespace": "" if group else NAMESPACE}}}
    result = cluster.plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review))
    assert json.loads(result.stdout)["status"].get("allowed", False) is allowed


def test_an_ephemeral_debug_container_may_not_target_the_sidecar(cluster: Cluster) -> None:
    refused = cluster.plane.kubectl("debug", "agent-1", "-n", NAMESPACE, "--image=busybox",
                                    "--target=capgate-sidecar", "--container=peek", check=False)
    assert refused.returncode != 0
    assert "ephemeral.capgate.dev" in refused.stderr
    # The restricted profile drops ALL capabilities: a debug container with NET_RAW could sniff the pod network.
    allowed = cluster.plane.kubectl("debug", "agent-1", "-n", NAMESPACE, "--image=busybox", "--target=agent",
                                    "--container=debug-agent", "--profile=restricted", check=False)
    assert allowed.returncode == 0, allowed.stderr


def test_the_sidecar_has_its_own_token_mount_even_when_the_pod_opts_out(cluster: Cluster) -> None:
    pod = agent_pod("no-token", NAMESPACE, "booking-agent", "booking-agent")
    pod["spec"]["automountServiceAccountToken"] = False
    assert cluster.apply(pod).returncode == 0
    created = json.loads(cluster.plane.kubectl("get", "pod", "no-token", "-n", NAMESPACE, "-o", "json").stdout)
    sidecar = next(c for c in created["spec"]["initContainers"] if c["name"] == "capgate-sidecar")
    paths = [m["mountPath"] for m in sidecar["volumeMounts"]]
    assert paths.count("/var/run/secrets/kubernetes.io/serviceaccount") == 1
    agent_mounts = [m["mountPath"] for m in created["spec"]["containers"][0].get("volumeMounts") or []]
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in agent_mounts
    # With the default automount, the ServiceAccount plugin leaves the sidecar's own mount alone.
    usual = json.loads(cluster.plane.kubectl("get", "pod", "agent-1", "-n", NAMESPACE, "-o", "json").stdout)
    usual_sidecar = next(c for c in usual["spec"]["initContainers"] if c["name"] == "capgate-sidecar")
    usual_paths = [m["mountPath"] for m in usual_sidecar["volumeMounts"]]
    assert usual_paths.count("/var/run/secrets/kubernetes.io/serviceaccount") == 1


def test_a_stopped_sidecar_leaves_a_ledger_every_record_of_which_is_signed(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.create_pod("agent-ledger", "booking-agent").returncode == 0
    sidecar = cluster.sidecar("agent-ledger")
    try:
        assert call(sidecar, "GET", "/flights/search")[0] == 200
        assert call(sidecar, "DELETE", "/payments/v1/charges/ch_1")[0] == 403
    finally:
        sidecar.stop()  # SIGTERM: the sidecar signs a closing checkpoint with its mounted session key
    secret = cluster.secret(cluster.get_capability("booking-agent")["status"]["credentialSecret"])
    assert secret is not None
    trust = tmp_path / "trust.json"
    trust.write_bytes(secret[resources.TRUST_BUNDLE_FILE])
    report = ledger.verify(sidecar.audit, keys.TrustBundle.from_file(trust))
    assert report.verdict() == "VERIFIED", report.summary()
    assert report.covered == report.records >= 4  # start, two decisions, the closing checkpoint
