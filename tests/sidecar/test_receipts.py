"""Carried receipts in the sidecar: a stolen session key proves nothing beyond its own credential.

The attacker here controls one sidecar completely (its session key included) and signs whatever it
likes with it; another sidecar must ignore every receipt that claims more than the key's
endorsement names, and every receipt of a revoked credential.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

from capgate.capabilities import receipts

from .conftest import MakeSidecar, Sidecar

CHARGE = "/payments/v1/charges"
CORR = {"X-Capgate-Correlation-Id": "booking-42"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(key: receipts.SessionKey, *, capability: str, credential: str, rule: str = "search") -> str:
    """A receipt signed with ``key`` that claims ``capability`` and ``credential``."""
    now = datetime.now(UTC)
    payload = json.dumps({"rule": rule, "corr": CORR["X-Capgate-Correlation-Id"], "cap": capability,
                          "cred": credential, "iat": int(now.timestamp()),
                          "exp": int((now + timedelta(minutes=5)).timestamp()), "did": "forged",
                          "sid": key.key_id}, sort_keys=True, separators=(",", ":")).encode()
    return f"v1.{_b64(payload)}.{_b64(key.sign(payload))}.{key.endorsement}"


def session_of(sc: Sidecar) -> receipts.SessionKey:
    assert sc.gate.store.current is not None
    return sc.gate.store.current.session


def credential_of(sc: Sidecar) -> str:
    assert sc.gate.store.current is not None
    return sc.gate.store.current.credential.id


async def charge_with(sc: Sidecar, receipt: str) -> tuple[int, list[str]]:
    response = await sc.client.post(CHARGE, json={"amount": 100}, headers={**CORR, "X-Capgate-Receipt": receipt})
    return response.status, sc.decisions()[-1].get("receipts_ignored", [])


async def test_a_session_key_of_one_capability_cannot_satisfy_another_capabilitys_requires(
        sidecar: MakeSidecar) -> None:
    compromised = await sidecar()                      # travel/booking-agent
    victim = await sidecar(namespace="finance")        # finance/booking-agent, same root key
    stolen = session_of(compromised)
    victim_cap = "finance/booking-agent"

    assert await charge_with(victim, forge(stolen, capability=victim_cap, credential=credential_of(victim))) == (
        403, ["unendorsed"])
    assert victim.upstream.seen == []
    # The compromised sidecar's honest receipts are its own capability's, so they do not count either.
    search = await compromised.client.get("/flights/search", headers=CORR)
    assert await charge_with(victim, search.headers["X-Capgate-Receipt"]) == (403, ["wrong_credential"])


async def test_revoking_a_credential_refuses_every_receipt_its_session_key_signs(sidecar: MakeSidecar) -> None:
    compromised, other_pod = await sidecar(), await sidecar()   # two pods of one capability, two credentials
    stolen = session_of(compromised)
    search = await compromised.client.get("/flights/search", headers=CORR)
    genuine = search.headers["X-Capgate-Receipt"]
    renamed = forge(stolen, capability="travel/booking-agent", credential=credential_of(other_pod))

    assert (await charge_with(other_pod, genuine))[0] == 200
    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    other_pod.gate.revocations.apply({"revokedIds": [{"id": credential_of(compromised), "expiresAt": expires}]})

    assert await charge_with(other_pod, genuine) == (403, ["wrong_credential"])
    assert await charge_with(other_pod, renamed) == (403, ["unendorsed"])
