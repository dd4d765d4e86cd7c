"""Secret hygiene: after a whole flow, the API key, private keys and credential appear nowhere they must not.

Recognisable canaries go in (an ``sk_live_CANARY_`` API key; the root and session private keys and
the credential token are read back from their Secrets), the flow runs (mint, inject, allowed and
denied calls, forged tokens, a narrowed token, a revocation), and then every place a person or an
agent can read is scanned: operator and sidecar logs, the audit ledger, statuses, events, the
RevocationList, both ``/metrics`` endpoints and every response (status, headers, body) the agent
got. The only places the key may be are its own Secret and the request the upstream receives.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from capgate import resources
from e2e.cluster import OPERATOR_NAMESPACE, environment, example_capability
from e2e.cluster import call as agent_call
from e2e.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "hygiene"
API_KEY = "sk_live_CANARY_4242_hygiene_9f8e7d6c5b4a"


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> str:
    with _opener().open(url, timeout=10) as response:
        return str(response.read().decode())


def _secret(plane: ControlPlane, namespace: str, name: str) -> dict[str, bytes]:
    api = plane.client()
    try:
        secret = k8s.CoreV1Api(api).read_namespaced_secret(name, namespace)
    finally:
        api.close()  # type: ignore[no-untyped-call]
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


@pytest.fixture(scope="module")
def flow(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the flow; yield the canaries and every readable text it produced."""
    with environment(control_plane, tmp_path_factory.mktemp("hygiene"), NAMESPACE, API_KEY) as env:
        operator, upstream = env.operator, env.upstream
        env.apply(example_capability("canary", NAMESPACE))
        env.wait_ready("canary", timeout=60)
        assert env.create_pod("agent", "canary").returncode == 0
        sidecar = env.sidecar("agent")
        credential = env.secret("canary" + resources.CREDENTIAL_SECRET_SUFFIX)
        assert credential is not None
        token = credential[resources.TOKEN_FILE].decode().strip()
        seen_by_agent: list[str] = []

        def call(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
            status, payload, response_headers = agent_call(sidecar, method, path, body, headers)
            seen_by_agent.append(f"{status}\n{response_headers}\n{json.dumps(payload)}")
            return payload

        call("GET", "/flights/search?from=SFO")
        call("POST", "/payments/v1/charges", {"amount": 100})
        call("POST", "/payments/v1/charges", {"amount": 500000})
        call("DELETE", "/payments/v1/charges/1")
        call("GET", "/flights/search", headers={"X-Capgate-Token": token[:-4]})
        call("GET", "/flights/search", headers={"X-Capgate-Token": token + "x"})
        call("POST", "/payments/v1/charges", {"amount": 1}, headers={"Authorization": "Bearer guess"})
        call("GET", "/_capgate/v1/whoami")
        call("POST", "/_capgate/v1/attenuate", {"rules": ["search"], "ttl": "5m"})
        call("GET", "/nope/x")
        control_plane.kubectl("patch", "acap", "canary", "-n", NAMESPACE, "--type=merge",
                              "-p", '{"spec":{"revoked":true}}')
        control_plane.kubectl("wait", "acap/canary", "-n", NAMESPACE, "--for=condition=Ready=False", "--timeout=30s")
        call("GET", "/flights/search")
        texts = {
            "operator log": operator.log.read_text(errors="replace"),
            "operator metrics": operator.metrics(),
            "sidecar metrics": _get(f"{sidecar.admin_url}/metrics"),
            "sidecar log": sidecar.log.read_text(errors="replace"),
            "audit ledger": sidecar.audit.read_text(errors="replace"),
            "capability status": control_plane.kubectl("get", "acap", "-A", "-o", "json").stdout,
            "events": control_plane.kubectl("get", "events", "-A", "-o", "json").stdout,
            "revocation list": control_plane.kubectl("get", "revocationlist", "-o", "json").stdout,
            "agent responses": "\n".join(seen_by_agent),
        }
        root = json.loads(_secret(control_plane, OPERATOR_NAMESPACE, resources.ROOT_KEY_SECRET)["keyset.json"])
        session = json.loads(credential[resources.SESSION_KEY_FILE])
        canaries = {"API key": API_KEY, "credential token": token, "session private key": session["private"],
                    **{f"root private key {k['id']}": k["private"] for k in root["keys"] if k.get("private")}}
        yield {"texts": texts, "canaries": canaries, "upstream": upstream}


def test_no_secret_appears_in_any_log_status_event_metric_or_response(flow: dict[str, Any]) -> None:
    texts: dict[str, str] = flow["texts"]
    canaries: dict[str, str] = flow["canaries"]
    leaks = [f"{what} in {where}" for where, text in texts.items() for what, value in canaries.items()
             if value and value in text]
    report = os.environ.get("CAPGATE_HYGIENE_REPORT")
    if report:
        Path(report).write_text(json.dumps({"sources": len(texts), "bytes": sum(len(t) for t in texts.values()),
                                            "secrets": len(canaries), "leaks": len(leaks)}))
    assert all(texts.values()), [where for where, text in texts.items() if not text]
    assert leaks == []


def test_the_api_key_reaches_only_the_upstream_it_is_for(flow: dict[str, Any]) -> None:
    seen = flow["upstream"].seen
    charges = [s for s in seen if s.path == "/v1/charges"]
    assert charges and all(s.headers.get("Authorization") == f"Bearer {API_KEY}" for s in charges)
    assert not any(API_KEY in json.dumps(s.headers) for s in seen if s.path != "/v1/charges")
