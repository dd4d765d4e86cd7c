"""The admin port (metrics, health, readiness), and secrets staying out of everything observable."""

from __future__ import annotations

from capgate.capabilities import tokens
from tests.sidecar.conftest import API_KEY, MakeSidecar


async def test_healthz_and_readyz_report_ok_with_a_valid_credential(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    assert (await sc.admin.get("/healthz")).status == 200
    ready = await sc.admin.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["ready"] is True


async def test_readyz_fails_when_the_credential_expired(sidecar: MakeSidecar) -> None:
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    sc = await sidecar()
    current = sc.gate.store.current
    assert current is not None
    expired = replace(current.credential, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    sc.gate.store.current = replace(current, credential=expired)
    ready = await sc.admin.get("/readyz")
    assert ready.status == 503


async def test_metrics_count_decisions_by_outcome_reason_and_upstream(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    await sc.client.get("/flights/search")
    await sc.client.delete("/flights/search")
    await sc.client.get("/nowhere")
    text = await (await sc.admin.get("/metrics")).text()
    assert 'capgate_decisions_total{outcome="allowed",reason="allowed",upstream="flights"} 1.0' in text
    assert 'capgate_decisions_total{outcome="denied",reason="deny_rule",upstream="flights"} 1.0' in text
    assert 'reason="unknown_upstream",upstream="_unknown"' in text
    assert "capgate_receipts_minted_total 1.0" in text
    assert "capgate_decision_seconds_bucket" in text
    assert 'capgate_upstream_seconds_count{upstream="flights"} 1.0' in text
    assert "capgate_lockdown 0.0" in text
    assert "capgate_revocation_list_age_seconds -1.0" in text
    assert "capgate_credential_expiry_timestamp_seconds 1." in text


async def test_secrets_never_reach_the_audit_log_metrics_or_error_bodies(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    loaded = sc.gate.store.current
    assert loaded is not None
    narrowed = tokens.attenuate(loaded.credential, rules=["search"])
    bodies = []
    search = await sc.client.get("/flights/search?api_key=querysecret", headers={"Authorization": "Bearer agentsecret"})
    receipt = search.headers["X-Capgate-Receipt"]
    for response in (
        await sc.client.post("/payments/v1/charges", json={"amount": 30000}, headers={"X-Capgate-Token": narrowed}),
        await sc.client.post("/payments/v1/charges", json={"amount": 30000}, headers={"X-Capgate-Receipt": receipt}),
        await sc.client.post("/payments/v1/charges", json={"amount": 10**9}),
        await sc.client.get("/flights/search", headers={"X-Capgate-Token": narrowed[:-8] + "AAAAAAAA"}),
        await sc.client.get("/_capgate/v1/whoami"),
    ):
        bodies.append(await response.text())
    observable = "\n".join([*bodies, sc.audit_path.read_text(), await (await sc.admin.get("/metrics")).text()])
    for secret in (API_KEY, loaded.credential.token, narrowed, receipt, "agentsecret", "querysecret",
                   loaded.session.private.hex()):
        assert secret not in observable
