"""Narrowed tokens (X-Capgate-Token), revocation, and a sidecar without a usable credential."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from capgate.capabilities import keys, tokens
from capgate.sidecar.watch import FileSource
from tests.sidecar.conftest import MakeSidecar, Sidecar


def base(sc: Sidecar) -> tokens.Credential:
    assert sc.gate.store.current is not None
    return sc.gate.store.current.credential


def narrowed(sc: Sidecar, **kwargs: object) -> str:
    return tokens.attenuate(base(sc), **kwargs)  # type: ignore[arg-type]


async def test_narrowed_token_allows_within_its_rules(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, rules=["search"])
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    assert response.status == 200
    assert sc.decisions()[-1]["narrowed"]


async def test_narrowed_token_denies_what_it_dropped_even_though_the_base_allows(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, rules=["charge"])
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    assert response.status == 403
    assert (await response.json())["error"] == "denied"


async def test_narrowed_limit_is_enforced_below_the_base_limit(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, limits={"charge": {"amount": 500}})
    await sc.client.get("/flights/search")
    low = await sc.client.post("/payments/v1/charges", json={"amount": 400}, headers={"X-Capgate-Token": token})
    high = await sc.client.post("/payments/v1/charges", json={"amount": 600}, headers={"X-Capgate-Token": token})
    assert (low.status, high.status) == (200, 403)


async def test_malformed_token_is_401(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": "garbage"})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (401, "invalid_token", "malformed")


async def test_forged_token_is_401_bad_signature(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, rules=["search"])
    raw = bytearray(token.encode())
    index = len(raw) - 20
    raw[index] = ord("A") if raw[index] != ord("A") else ord("B")
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": raw.decode()})
    body = await response.json()
    assert response.status == 401
    assert body["reason"] in ("bad_signature", "malformed")


async def test_token_from_another_root_is_401_unknown_root(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    other = keys.KeySet.generate()
    token = tokens.mint(base(sc).capability, other)
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["reason"]) == (401, "unknown_root")


async def test_expired_token_is_401_expired(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await sidecar()
    token = tokens.mint(base(sc).capability, keyset, now=datetime.now(UTC) - timedelta(hours=3),
                        ttl=timedelta(hours=1))
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["reason"]) == (401, "expired")


async def test_narrowed_token_with_a_short_ttl_expires(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, ttl=timedelta(seconds=10), now=datetime.now(UTC) - timedelta(minutes=5))
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["reason"]) == (401, "expired")


async def test_a_token_issued_120_s_in_the_future_is_401_not_yet_valid(sidecar: MakeSidecar,
                                                                     keyset: keys.KeySet) -> None:
    sc = await sidecar()
    token = tokens.mint(base(sc).capability, keyset, now=datetime.now(UTC) + timedelta(seconds=120))
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["error"], body["reason"]) == (401, "invalid_token", "not_yet_valid")
    assert sc.upstream.seen == []


async def test_a_narrowed_token_stamped_in_the_future_is_401_not_yet_valid(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    token = narrowed(sc, rules=["search"], now=datetime.now(UTC) + timedelta(seconds=120))
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["reason"]) == (401, "not_yet_valid")


async def write_revocations(path: Path, ids: list[str], lockdown: dict[str, object] | None = None) -> None:
    path.write_text(json.dumps({"spec": {"revokedIds": [{"id": i, "expiresAt": "2099-01-01T00:00:00Z"} for i in ids],
                                         "lockdown": lockdown or {}}}))


async def test_revoked_narrowed_token_is_401_revoked(sidecar: MakeSidecar, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    sc = await sidecar(revocations=revocations)
    token = narrowed(sc, rules=["search"])
    child = sc.gate.store.verifier.load(token)  # type: ignore[union-attr]
    await write_revocations(revocations, [child.revocation_ids[-1]])
    assert FileSource(revocations).read(sc.gate.revocations)
    response = await sc.client.get("/flights/search", headers={"X-Capgate-Token": token})
    body = await response.json()
    assert (response.status, body["reason"]) == (401, "revoked")
    assert (await sc.client.get("/flights/search")).status == 200  # the base credential is untouched


async def test_revoking_the_base_credential_revokes_everything_derived(sidecar: MakeSidecar, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    sc = await sidecar(revocations=revocations)
    token = narrowed(sc, rules=["search"])
    await write_revocations(revocations, [base(sc).id])
    changed = sc.gate.revocations.changed
    FileSource(revocations).read(sc.gate.revocations)
    await changed.wait()
    for headers in ({}, {"X-Capgate-Token": token}):
        response = await sc.client.get("/flights/search", headers=headers)
        assert response.status == 401
        assert (await response.json())["reason"] == "revoked"
    assert sc.upstream.seen == []


async def test_revocation_file_is_picked_up_by_the_poller(sidecar: MakeSidecar, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    await write_revocations(revocations, [])
    sc = await sidecar(revocations=revocations, poll_seconds=0.05)
    assert (await sc.client.get("/flights/search")).status == 200
    changed = sc.gate.revocations.changed
    await write_revocations(revocations, [base(sc).id])
    while base(sc).id not in sc.gate.revocations.revoked_ids:
        await changed.wait()
        changed = sc.gate.revocations.changed
    assert (await sc.client.get("/flights/search")).status == 401
