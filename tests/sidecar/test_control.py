"""The /_capgate/v1/ control API: authorize, attenuate, whoami."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.sidecar.conftest import API_KEY, BASE_SPEC, MakeSidecar

AUTHORIZE = "/_capgate/v1/authorize"
ATTENUATE = "/_capgate/v1/attenuate"


async def test_authorize_answers_allowed_for_a_permitted_call(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post(AUTHORIZE, json={
        "context": {"method": "GET", "upstream": "flights", "path": "/search"}})
    body = await response.json()
    assert response.status == 200
    assert (body["allowed"], body["rule"]) == (True, "search")
    assert body["decision_id"] == response.headers["X-Capgate-Decision-Id"]
    assert sc.upstream.seen == []


async def test_authorize_sees_held_receipts_and_limits(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    ctx = {"method": "POST", "upstream": "payments", "path": "/v1/charges", "body": {"amount": 30000}}
    before = await sc.client.post(AUTHORIZE, json={"context": ctx})
    assert (before.status, (await before.json())["reason"]) == (403, "missing_receipt")
    await sc.client.get("/flights/search")
    after = await sc.client.post(AUTHORIZE, json={"context": ctx})
    assert after.status == 200
    over = await sc.client.post(AUTHORIZE, json={"context": {**ctx, "body": {"amount": 10**6}}})
    assert (await over.json())["reason"] == "limit_exceeded"


async def test_authorize_with_several_scopes_needs_all_to_allow(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post(AUTHORIZE, json={"scopes": [
        {"context": {"method": "GET", "upstream": "flights", "path": "/search"}},
        {"context": {"method": "DELETE", "upstream": "flights", "path": "/search"}},
    ]})
    body = await response.json()
    assert response.status == 403
    assert (body["allowed"], body["reason"], body["rule"]) == (False, "deny_rule", "no-deletes")
    assert [r["allowed"] for r in body["results"]] == [True, False]


async def test_authorize_refuses_a_malformed_request_with_400(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    for payload in (b"not json", b"[]", b'{"scopes": []}', b'{"context": {"path": "/a/../b"}}'):
        response = await sc.client.post(AUTHORIZE, data=payload)
        assert response.status == 400, payload
        assert (await response.json())["error"] == "bad_request"


async def test_attenuate_returns_a_token_that_narrows_the_proxy(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post(ATTENUATE, json={"rules": ["search"], "ttl": "5m"})
    body = await response.json()
    assert response.status == 200, body
    assert len(body["revocationIds"]) == 2
    assert body["expiresAt"].endswith("Z")
    token = body["token"]
    assert (await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})).status == 200
    denied = await sc.client.post("/flights/upload", data=b"x", headers={"X-Capgate-Token": token})
    assert denied.status == 403
    assert token not in sc.audit_path.read_text()


async def test_attenuate_refuses_to_widen(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.post(ATTENUATE, json={"limits": {"charge": {"amount": 10**9}}})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (403, "denied", "attenuation_refused")
    narrowed = (await (await sc.client.post(ATTENUATE, json={"rules": ["search"]})).json())["token"]
    wider = await sc.client.post(ATTENUATE, json={"rules": ["charge"]}, headers={"X-Capgate-Token": narrowed})
    assert wider.status == 200
    token = (await wider.json())["token"]
    # Narrowing a narrowed token appends a check: "charge" can never pass both blocks.
    await sc.client.get("/flights/search")
    charge = await sc.client.post("/payments/v1/charges", json={"amount": 1}, headers={"X-Capgate-Token": token})
    assert charge.status == 403


async def test_whoami_describes_the_capability_without_secrets(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/_capgate/v1/whoami")
    body = await response.json()
    assert response.status == 200
    assert body["capability"] == "travel/booking-agent"
    assert body["principal"] == "travel/booking-agent"
    assert body["mode"] == "enforce"
    assert body["lockdown"]["active"] is False
    assert [r["name"] for r in body["rules"]] == ["search", "browse", "charge", "no-deletes"]
    text = await response.text()
    assert API_KEY not in text
    loaded = sc.gate.store.current
    assert loaded is not None
    assert loaded.credential.token not in text


async def test_unknown_control_endpoint_is_404_json(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/_capgate/v2/nothing")
    assert response.status == 404
    assert (await response.json())["reason"] == "unknown_endpoint"
    assert "X-Capgate-Decision-Id" in response.headers


def workspace_spec() -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    spec["rules"] += [
        {"name": "workspace", "effect": "allow", "actions": ["file.read"], "resources": ["file:///workspace/**"]},
        {"name": "no-secrets", "effect": "deny", "resources": ["file:///workspace/secrets/**"]},
    ]
    return spec


@pytest.mark.parametrize("resource", [
    "file:///workspace/../etc/passwd", "file:///workspace/%2e%2e/etc/passwd", "file:///workspace/./secrets/key",
    "file:///workspace//etc/passwd", "file:///workspace/a%2fb", "file:///workspace/a\x00b",
    "file:///workspace/a\nb", "file:///workspace/.../b", "./secrets/key", "secrets/key",
])
async def test_authorize_refuses_an_ambiguous_resource_with_400(sidecar: MakeSidecar, resource: str) -> None:
    sc = await sidecar(workspace_spec())
    response = await sc.client.post(AUTHORIZE, json={"action": "file.read", "resource": resource})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (400, "bad_request", "ambiguous_resource")


@pytest.mark.parametrize("resource", ["file:///workspace/secrets/key", "file:///workspace/%73ecrets/key",
                                      "file:///workspace/SECRETS/key", "file:///workspace/secrets./key"])
async def test_authorize_denies_every_spelling_of_a_denied_resource(sidecar: MakeSidecar, resource: str) -> None:
    sc = await sidecar(workspace_spec())
    response = await sc.client.post(AUTHORIZE, json={"action": "file.read", "resource": resource})
    body = await response.json()
    assert (response.status, body["reason"], body["rule"]) == (403, "deny_rule", "no-secrets")


@pytest.mark.parametrize("payload", [{}, {"context": {}}, {"context": {"body": {"amount": 1}}},
                                     {"context": {"method": "GET", "path": "/search"}},
                                     {"scopes": [{"context": {"method": "GET", "upstream": "flights",
                                                              "path": "/search"}}, {}]}])
async def test_authorize_refuses_a_scope_that_asks_nothing_with_400(sidecar: MakeSidecar,
                                                                    payload: dict[str, Any]) -> None:
    sc = await sidecar()
    response = await sc.client.post(AUTHORIZE, json=payload)
    body = await response.json()
    assert (response.status, body["error"]) == (400, "bad_request"), payload


async def test_an_action_with_an_http_context_needs_both_to_allow(sidecar: MakeSidecar) -> None:
    sc = await sidecar(workspace_spec())
    search = {"method": "GET", "upstream": "flights", "path": "/search"}
    upload = {"method": "DELETE", "upstream": "flights", "path": "/search"}

    denied_action = await sc.client.post(AUTHORIZE, json={"action": "file.write", "resource": "file:///workspace/a",
                                                          "context": search})
    denied_call = await sc.client.post(AUTHORIZE, json={"action": "file.read", "resource": "file:///workspace/a",
                                                        "context": upload})
    both = await sc.client.post(AUTHORIZE, json={"action": "file.read", "resource": "file:///workspace/a",
                                                 "context": search})

    assert (denied_action.status, (await denied_action.json())["reason"]) == (403, "no_matching_rule")
    assert (denied_call.status, (await denied_call.json())["reason"]) == (403, "deny_rule")
    assert both.status == 200


async def test_an_allowed_authorize_is_recorded_with_what_it_allowed(sidecar: MakeSidecar) -> None:
    sc = await sidecar(workspace_spec())
    one = await sc.client.post(AUTHORIZE, json={"action": "file.read", "resource": "file:///workspace/%61.txt"})
    several = await sc.client.post(AUTHORIZE, json={"scopes": [
        {"action": "file.read", "resource": "file:///workspace/b"},
        {"context": {"method": "GET", "upstream": "flights", "path": "/search"}}]})
    assert (one.status, several.status) == (200, 200)

    first, second = [r for r in sc.decisions() if r["kind"] == "authorize"]

    assert (first["outcome"], first["action"], first["resource"], first["rule"]) == (
        "allowed", "file.read", "file:///workspace/a.txt", "workspace")
    assert (second["action"], second["resource"]) == ("file.read", "file:///workspace/b")
    assert second["scopes"] == [
        {"allowed": True, "reason": "allowed", "rule": "workspace", "action": "file.read",
         "resource": "file:///workspace/b"},
        {"allowed": True, "reason": "allowed", "rule": "search", "method": "GET", "upstream": "flights",
         "path": "/search"}]
